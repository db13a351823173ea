"""The resolver tunneld uses where no `ssh` binary exists, against the real `ssh -G`: a corpus of 50 ssh_configs
(tests/ssh_config_corpus), compared on every TunnelSpec field tunneld uses."""

from __future__ import annotations

import shutil
from pathlib import Path

from tunneld.config.fallback import RESOLVER
from tunneld.config.resolve import SSH_G, Resolver, fallback_resolver, resolve_host
from tunneld.errors import ConfigError

CORPUS = Path(__file__).parent / "ssh_config_corpus"
SPEC_FIELDS = (
    "hostname", "port", "user", "forwards", "identity_files", "certificate_files", "identities_only",
    "identity_agent", "proxy_jump", "jump_first_hop", "proxy_command", "host_key_alias", "strict_host_key_checking",
    "user_known_hosts_files", "global_known_hosts_files", "keepalive_interval_s", "keepalive_count_max",
    "keepalive_from_user", "connect_timeout_s", "connect_timeout_from_user",
)  # fmt: skip
# ssh_config options tunneld reads through TunnelSpec.option (listen.py, sshkeys.py, render.py), and ControlPath.
OPTIONS = ("gatewayports", "addressfamily", "forwardagent", "forwardx11", "permitlocalcommand", "hashknownhosts",
           "verifyhostkeydns", "controlpath")  # fmt: skip


def copy_corpus(tmp_path: Path) -> Path:
    """The corpus under tmp_path, its `@DIR@` (Include paths) pointing at the copy."""
    target = tmp_path / "corpus"
    shutil.copytree(CORPUS, target)
    for path in target.rglob("*.conf"):
        path.write_bytes(path.read_bytes().replace(b"@DIR@", str(target).encode()))
    return target


def alias_of(config: Path) -> str:
    """The host each corpus file is resolved for: its first line says `# host: ALIAS`."""
    return config.read_text().splitlines()[0].removeprefix("# host:").strip()


def what_tunneld_uses(alias: str, config: Path, resolver: Resolver) -> dict[str, object]:
    """The fields of the spec tunneld acts on, or the configuration error (its `FILE line N: reason`)."""
    try:
        spec = resolve_host(alias, str(config), require_forwards=False, resolver=resolver)
    except ConfigError as error:
        return {"error": error.message}
    return {**{name: getattr(spec, name) for name in SPEC_FIELDS}, **{key: spec.option(key, "-") for key in OPTIONS}}


def differences(corpus: Path, resolver: Resolver) -> dict[str, dict[str, tuple[object, object]]]:
    """Config file name -> {field: (ssh -G's value, the resolver's)} for every config where they differ."""
    found = {}
    for config in sorted(corpus.glob("*.conf")):
        alias = alias_of(config)
        truth, ours = what_tunneld_uses(alias, config, SSH_G), what_tunneld_uses(alias, config, resolver)
        keys = sorted(set(truth) | set(ours))
        diff = {key: (truth.get(key), ours.get(key)) for key in keys if truth.get(key) != ours.get(key)}
        if diff:
            found[config.name] = diff
    return found


def test_the_corpus_has_fifty_configs_each_naming_its_host() -> None:
    configs = sorted(CORPUS.glob("*.conf"))
    assert len(configs) == 50
    assert all(alias_of(config) for config in configs)


def test_the_fallback_resolves_every_corpus_config_as_ssh_g_does(tmp_path: Path) -> None:
    corpus = copy_corpus(tmp_path)
    different = differences(corpus, fallback_resolver())
    assert not different, "\n".join(f"{name}: {diff}" for name, diff in different.items())


def test_the_fallback_names_itself(tmp_path: Path) -> None:
    config = copy_corpus(tmp_path) / "01-basic.conf"
    assert resolve_host("mlflowserver", str(config), resolver=fallback_resolver()).resolver == RESOLVER
