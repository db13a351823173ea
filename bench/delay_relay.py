"""`python bench/delay_relay.py HOST PORT DELAY_MS`: tests.harness.DelayRelay in a process of its own.

The benchmark's client reads the transfer in the bench process; a relay in that process would share
its GIL and pace the transfer by the client's work, not by the path. Prints the relay's port, then
relays until stdin closes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import DelayRelay


def main() -> None:
    relay = DelayRelay((sys.argv[1], int(sys.argv[2])), int(sys.argv[3]))
    print(relay.port, flush=True)
    sys.stdin.read()
    relay.close()


if __name__ == "__main__":
    main()
