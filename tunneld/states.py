"""The tunnel states of DESIGN.md, shared by the supervisor that sets them and `status` that shows them."""

STARTING = "starting"
CONNECTING = "connecting"
UP = "up"
DEGRADED = "degraded"
LOST = "lost"
BACKOFF = "backoff"
IDLE = "idle"  # on demand: listening, not connected; the first client brings the link up
# The link worked before and now the login is refused (agent emptied or locked, key expired, the interactive
# login connection gone): waits for the credentials to change or for `tunneld login`, never on a timer.
NEEDS_AUTH = "needs-auth"
FAILED = "failed"
STOPPED = "stopped"
RUNNING_STATES = (STARTING, CONNECTING, UP, DEGRADED, LOST, BACKOFF, IDLE, NEEDS_AUTH)
READY_STATES = (UP, DEGRADED, IDLE)  # what `start` waits for and `wait` accepts
ALL_STATES = (*RUNNING_STATES, FAILED, STOPPED)

# What a single forward is while its link is up.
FORWARD_OK = "ok"
FORWARD_DEGRADED = "degraded"
