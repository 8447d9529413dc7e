"""README.md's shell blocks, as a newcomer pastes them.

Every fenced block tagged sh, bash, console or shell (and every untagged one) must be in one of the lists below,
or `test_every_shell_block_is_run_or_checked` fails:
- RUN: run here with bash, from a temporary copy of the repository root (`examples/`, and `.venv` linked), with
  the venv's bin first on PATH. Each test checks that the ports the block uses are free first (skips if not), what
  the block is meant to show, its exit status, and that afterwards no process it started is left (every one is in
  the session bash started) and its ports are free again. A foreground block is stopped as Ctrl-C stops it: SIGINT
  to its whole process group.
- CHECKED: cannot run here (docker, kubectl, other hosts, system packages, ten minutes of fuzzing); each names the
  test that checks what it relies on (that test must exist), and some get a check here too (`--check` on the
  several-hosts command lines, the Kubernetes objects kubectl names, the package list against .ci/run's).
- SYNOPSES: untagged usage lines (`[--flag]`, `A|B`), grammar rather than commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import ROOT, wait_for
from tests.deploy.kubernetes import load

README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
SHELL_TAGS = {"sh", "bash", "console", "shell"}
FENCE = re.compile(r"^```(.*)$")
BLOCK_TIMEOUT = 90.0
ETCD_PEER_PORT = 2380  # etcd's default peer port: the etcd block binds it without naming it

STANDALONE = '(.venv/bin/python examples/hello_service.py --port 9101 & trap "kill $!" EXIT'
REQUEST_LOOKUP = "ID=$(curl -s -H 'Host: hello' -D - -o /dev/null http://127.0.0.1:8080/"
MESH = ".venv/bin/python examples/hello_service.py --port 9101 & PIDS=$!"
ETCD_REGISTER = "etcd --data-dir ./etcd-data --logger zap --log-level error & PIDS=$!"
ETCDCTL = "LEASE=$(etcdctl lease grant 10 | awk '{print $2}')"
SEVERAL_HOSTS_DASHBOARD = "meshgate dashboard --listen 0.0.0.0:9000 --san dashboard.internal"
SEVERAL_HOSTS_GATEWAY = "meshgate gateway --control https://dashboard.internal:9000 --group catalog"
APT = "sudo apt-get update && sudo apt-get install"
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/pytest"

# The start of a block's first line -> the test in this file that runs it.
RUN = {
    STANDALONE: "test_standalone_gateway_answers_and_ctrl_c_stops_both",
    REQUEST_LOOKUP: "test_standalone_gateway_answers_and_ctrl_c_stops_both",
    MESH: "test_one_machine_mesh_walkthrough",
    ETCD_REGISTER: "test_etcd_discovery_with_meshgate_register",
    ETCDCTL: "test_etcdctl_registration",
}
# The start of a block's first line -> "file::test" that checks what it relies on.
COMPOSE = "tests/deploy/test_compose.py"
KUBERNETES = "tests/deploy/test_kubernetes.py"
HERE = "tests/e2e/test_readme.py"
KUBECTL_NAMES = f"{HERE}::test_the_kubernetes_objects_kubectl_names_exist"
CHECKED = {
    "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/meshgate demo": (
        "tests/e2e/test_demo.py::test_the_demo_runs_a_live_mesh_and_leaves_nothing_behind"
    ),
    APT: f"{HERE}::test_the_package_list_is_what_ci_installs",
    TEST_COMMAND: f"{HERE}::test_ci_runs_the_test_command_as_written",
    "nice -n 10 .venv/bin/python -m tests.fuzz.request_path": (
        "tests/fuzz/test_request_path.py::test_corpus_input_keeps_every_invariant"
    ),
    SEVERAL_HOSTS_DASHBOARD: f"{HERE}::test_several_hosts_commands_pass_check",
    SEVERAL_HOSTS_GATEWAY: f"{HERE}::test_several_hosts_commands_pass_check",
    "docker compose -f compose/docker-compose.yml up --build -d": (
        f"{COMPOSE}::test_every_command_line_passes_the_cli_check"
    ),
    "docker compose -f compose/docker-compose.yml up -d --scale catalog-v2=3": (
        f"{COMPOSE}::test_apps_reach_only_their_own_gateway_and_mesh_yaml_names_them"
    ),
    "docker build -t meshgate:0.1.0 .": f"{COMPOSE}::test_the_image_copies_everything_the_wheel_is_built_from",
    ".venv/bin/meshgate dashboard ca --data ./mesh-ca --out ca.pem": f"{KUBERNETES}::test_the_manifests_pass_the_check",
    "kubectl apply -k deploy/kubernetes": f"{KUBERNETES}::test_every_meshgate_command_line_passes_check",
    "kubectl -n meshgate exec deploy/meshgate-dashboard -c dashboard -- \\": KUBECTL_NAMES,
    "kubectl -n shop scale deploy/catalog-v2 --replicas=3": KUBECTL_NAMES,
    ".venv/bin/pytest tests/deploy/test_kubernetes.py": f"{KUBERNETES}::test_the_manifests_pass_the_check",
    "kubectl -n meshgate set image deploy/meshgate-dashboard": KUBECTL_NAMES,
}
SYNOPSES = (
    "meshgate gateway --config FILE [--advertise HOST:PORT]",
    "meshgate dashboard [--listen 127.0.0.1:9000]",
    "meshgate gateway --control URL --group NAME",
    "meshgate rollout start SERVICE --canary SUBSET",
)


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence
    tag: str
    text: str

    @property
    def first(self) -> str:
        return self.text.splitlines()[0] if self.text else ""


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    opened: Block | None = None
    lines: list[str] = []
    for number, line in enumerate(README.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if fence and opened is None:
            opened, lines = Block(number, fence.group(1).strip(), ""), []
        elif fence and opened is not None:
            blocks.append(Block(opened.line, opened.tag, "\n".join(lines) + "\n"))
            opened = None
        elif opened is not None:
            lines.append(line)
    assert opened is None, f"README.md:{opened.line}: a fence is never closed"
    return blocks


def shell_blocks() -> list[Block]:
    return [block for block in readme_blocks() if block.tag in SHELL_TAGS or not block.tag]


def block(start: str) -> Block:
    (found,) = [candidate for candidate in shell_blocks() if candidate.first.startswith(start)]
    return found


def is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def ports_of(text: str) -> set[int]:
    """The ports a block listens on or calls: `host:port`, `--port N`, and those of the example files it names."""
    for name in re.findall(r"examples/[\w.-]+\.yaml", text):
        text += (ROOT / name).read_text()
    return {int(port) for port in re.findall(r"(?:127\.0\.0\.1:|--port )(\d+)\b", text)}


def require_free(ports: set[int]) -> None:
    busy = sorted(port for port in ports if not is_free(port))
    if busy:
        pytest.skip(f"the README block uses fixed ports and these are taken here: {busy}")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A stand-in for the repository root: what the blocks read, and the venv; what they write stays here."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (tmp_path / ".venv").symlink_to(VENV_BIN.parent)
    return tmp_path


def environment() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MESHGATE_")}
    return {**env, "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}


class Shell:
    """`bash` running one block in a session of its own, so every process the block starts can be found."""

    def __init__(self, text: str, cwd: Path) -> None:
        self.script = cwd / f"block-{time.monotonic_ns()}.sh"
        self.script.write_text(text)
        self.output = cwd / f"{self.script.stem}.out"
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                ["bash", str(self.script)],
                cwd=cwd,
                env=environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait(self, timeout: float = BLOCK_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the block ran past {timeout}s:\n{self.text()}") from None

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # what the terminal sends to the foreground job

    def left(self) -> list[psutil.Process]:
        """Processes still in the block's session (the block's own bash included until it exits)."""
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.proc.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass  # gone meanwhile, or not ours
        return found

    def kill_all(self) -> None:
        left = self.left()
        for proc in left:
            proc.kill()
        psutil.wait_procs(left, timeout=10)  # gone, so its ports are free for the next test
        self.proc.wait(10)


@pytest.fixture
def shells() -> Iterator[list[Shell]]:
    started: list[Shell] = []
    yield started
    for shell in started:  # only after a failure is anything left to clean up
        shell.kill_all()


def run_block(shells: list[Shell], text: str, cwd: Path) -> Shell:
    shell = Shell(text, cwd)
    shells.append(shell)
    return shell


def assert_nothing_left(shell: Shell, ports: set[int], timeout: float = 5.0) -> None:
    wait_for(lambda: not shell.left(), timeout=timeout, what="the block's processes to exit")
    busy = sorted(port for port in ports if not is_free(port))
    assert not busy, f"still listening after the block: {busy}"


def get(url: str, **kwargs: object) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2.0, **kwargs)  # type: ignore[arg-type]
    except httpx.HTTPError:
        return None  # not listening yet


def ok(url: str, **kwargs: object) -> httpx.Response | None:
    """The answer once it is a 200."""
    answer = get(url, **kwargs)
    return answer if answer is not None and answer.status_code == 200 else None


# The list


def test_every_shell_block_is_run_or_checked() -> None:
    unlisted = []
    for found in shell_blocks():
        listed = [*RUN, *CHECKED] if found.tag else SYNOPSES
        if not any(found.first.startswith(start) for start in listed):
            unlisted.append(f"README.md:{found.line}: {found.first}")
    assert not unlisted, "run these blocks in tests/e2e/test_readme.py, or name what checks them:\n" + "\n".join(
        unlisted
    )


def test_each_listed_block_is_in_the_readme_once_and_its_check_exists() -> None:
    firsts = [found.first for found in shell_blocks()]
    for start in [*RUN, *CHECKED, *SYNOPSES]:
        assert sum(first.startswith(start) for first in firsts) == 1, f"not exactly one README block: {start}"
    here = Path(__file__).read_text()
    assert all(f"def {name}(" in here for name in RUN.values())
    for reference in CHECKED.values():
        path, name = reference.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), f"{reference} does not exist"


def test_the_check_of_the_list_sees_a_new_block(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text() + "\n```bash\nmeshgate something-new\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "README", readme)
    with pytest.raises(AssertionError, match="meshgate something-new"):
        test_every_shell_block_is_run_or_checked()


# Checked here


def test_the_package_list_is_what_ci_installs() -> None:
    (ci,) = re.findall(r"apt-get install -y -qq ([^>\n]+)", (ROOT / ".ci" / "run").read_text())
    (readme,) = [line for line in block(APT).text.splitlines() if line.startswith(APT)]
    assert readme.removeprefix(APT).split() == ci.split()


def test_ci_runs_the_test_command_as_written() -> None:
    assert block(TEST_COMMAND).text.strip() == TEST_COMMAND
    assert TEST_COMMAND.replace("pip install", "pip install -q") in (ROOT / ".ci" / "run").read_text()


def commands(text: str) -> list[list[str]]:
    """The block's command lines, continuations joined and comments dropped."""
    return [shlex.split(line, comments=True) for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def test_several_hosts_commands_pass_check(tmp_path: Path) -> None:
    """The long-running commands pass `--check` (no network, nothing written); the one-shot ones run, with the
    state directory and the copied root under tmp_path instead of /var/lib and /tmp."""
    shutil.copy(ROOT / "examples" / "mesh.yaml", tmp_path / "mesh.yaml")
    shutil.copy(ROOT / "examples" / "hello-gateway.yaml", tmp_path / "gateway.yaml")
    long_running: list[list[str]] = []
    one_shot: list[list[str]] = []
    for argv in commands(block(SEVERAL_HOSTS_DASHBOARD).text) + commands(block(SEVERAL_HOSTS_GATEWAY).text):
        assert argv[0] == "meshgate", argv
        (one_shot if argv[1:3] in (["dashboard", "ca"], ["dashboard", "token"]) else long_running).append(argv)
    assert [argv[1] for argv in long_running] == ["dashboard", "gateway"]
    for argv in long_running:
        done = subprocess.run([*argv, "--check"], cwd=tmp_path, env=environment(), capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.startswith("ok: "), (argv, done.stdout, done.stderr)
    for argv in one_shot:
        argv = [arg.replace("/var/lib/", f"{tmp_path}/var-lib-").replace("/tmp/", f"{tmp_path}/") for arg in argv]
        done = subprocess.run(argv, cwd=tmp_path, env=environment(), capture_output=True, text=True)
        assert done.returncode == 0, (argv, done.stderr)
    assert (tmp_path / "mesh-ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert (tmp_path / "catalog.token").read_text().strip()


KUBECTL_OBJECT = re.compile(r"kubectl -n (\S+) (?:[\w-]+ )+?(deploy|svc)/([\w-]+)")
SET_IMAGE = re.compile(r"kubectl -n (\S+) set image deploy/([\w-]+)((?: [\w-]+=\S+)+)")


def test_the_kubernetes_objects_kubectl_names_exist() -> None:
    """Every Deployment and Service a README kubectl line names is in deploy/kubernetes, in that namespace, and
    `set image` names containers those Deployments have."""
    cluster = load()
    text = "".join(found.text for found in shell_blocks() if "kubectl" in found.text)
    named = KUBECTL_OBJECT.findall(text)
    assert len(named) >= 10, named
    kinds = {"deploy": "Deployment", "svc": "Service"}
    missing = [f"{ns}/{kind}/{name}" for ns, kind, name in named if cluster.get(kinds[kind], ns, name) is None]
    assert not missing, missing
    images = SET_IMAGE.findall(text)
    assert images
    for namespace, name, pairs in images:
        deployment = cluster.get("Deployment", namespace, name)
        assert deployment is not None
        spec = deployment["spec"]["template"]["spec"]
        containers = {c["name"] for c in spec["containers"] + spec.get("initContainers", [])}
        wanted = {pair.split("=")[0] for pair in pairs.split()}
        assert wanted <= containers, (name, wanted - containers)


# Run here


def test_standalone_gateway_answers_and_ctrl_c_stops_both(workdir: Path, shells: list[Shell]) -> None:
    text = block(STANDALONE).text
    ports = ports_of(text)
    require_free(ports)
    shell = run_block(shells, text, workdir)
    ready = wait_for(
        lambda: shell.proc.poll() is not None or ok("http://127.0.0.1:15000/ready"), timeout=30.0, what="/ready"
    )
    assert ready is not True, f"the block exited:\n{shell.text()}"
    answer = get("http://127.0.0.1:8080/", headers={"Host": "hello"})  # "from another terminal"
    assert answer is not None and answer.status_code == 200
    assert answer.json()["service"] == "hello"
    assert answer.json()["request_id"] == answer.headers["x-request-id"]
    config = get("http://127.0.0.1:15000/config")
    assert config is not None and "127.0.0.1:9101" in config.text

    lookup = run_block(shells, block(REQUEST_LOOKUP).text, workdir)
    assert lookup.wait(30.0) == 0, lookup.text()
    found = json.loads(lookup.text())  # the hop record of the request the block's first curl made
    assert found["request_id"] not in ("", answer.headers["x-request-id"]), found
    assert [hop["destination"] for hop in found["hops"]] == ["hello"], found

    shell.ctrl_c()
    assert shell.wait(30.0) == 0, shell.text()
    assert_nothing_left(shell, ports)


def test_the_leftover_check_catches_the_old_standalone_line(workdir: Path, shells: list[Shell]) -> None:
    """The README's line before the trap: Ctrl-C stopped the gateway and left the service listening."""
    text = (
        "(.venv/bin/python examples/hello_service.py --port 9101 &"
        " .venv/bin/meshgate gateway --config examples/hello.yaml)\n"
    )
    ports = ports_of(text)
    require_free(ports)
    shell = run_block(shells, text, workdir)
    wait_for(lambda: ok("http://127.0.0.1:8080/", headers={"Host": "hello"}), timeout=30.0, what="the gateway")
    shell.ctrl_c()
    shell.wait(30.0)
    with pytest.raises(AssertionError, match="the block's processes to exit"):
        assert_nothing_left(shell, ports, timeout=1.0)
    assert not is_free(9101)


@pytest.mark.slow
def test_one_machine_mesh_walkthrough(workdir: Path, shells: list[Shell]) -> None:
    text = block(MESH).text
    ports = ports_of(text)
    assert {9000, 9101, 9102, 15006, 16001} <= ports
    require_free(ports)
    shell = run_block(shells, text, workdir)
    status = shell.wait()
    output = shell.text()
    assert status == 0, output
    assert '"service": "hello"' in output  # the call through front's outbound listener
    assert '{"version":2,"changed":true}' in output  # the weights change
    gateways = {line.split()[0]: line.split() for line in output.splitlines() if re.match(r"(front|hello) ", line)}
    assert sorted(gateways) == ["front", "hello"] and all("live" in row for row in gateways.values()), output
    assert re.search(r"^2 .*canary looks good", output, re.MULTILINE), output
    assert (workdir / "mesh-data" / "mesh.db").exists()  # the state stays
    assert_nothing_left(shell, ports)


def test_etcd_discovery_with_meshgate_register(workdir: Path, shells: list[Shell]) -> None:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    text = block(ETCD_REGISTER).text
    ports = ports_of(text) | {ETCD_PEER_PORT}
    assert {2379, 8080, 9101} <= ports
    require_free(ports)
    shell = run_block(shells, text, workdir)
    status = shell.wait()
    output = shell.text()
    assert status == 0, output
    registered = output.index("registered /meshgate/endpoints/hello/v1/127.0.0.1:9101")
    answered = output.index('"service": "hello"')
    unregistered = output.index("unregistered /meshgate/endpoints/hello/v1/127.0.0.1:9101")
    refused = output.index("meshgate: no endpoints available in hello/v1")
    assert registered < answered < unregistered < refused, output
    assert_nothing_left(shell, ports)


def test_etcdctl_registration(workdir: Path, shells: list[Shell]) -> None:
    if shutil.which("etcdctl") is None:
        pytest.skip("etcdctl is not installed here (Debian's etcd-client), so the etcdctl block is not run")
    etcd_text = block(ETCD_REGISTER).text
    start = "\n".join(etcd_text.splitlines()[:2]) + "\n"  # the block's etcd, started and waited for
    require_free({2379, ETCD_PEER_PORT})
    etcd = run_block(shells, start + "wait\n", workdir)
    wait_for(lambda: ok("http://127.0.0.1:2379/health"), timeout=30.0, what="etcd")
    shell = run_block(shells, block(ETCDCTL).text, workdir)
    assert shell.wait(30.0) == 0, shell.text()
    assert "revoked" in shell.text()
    etcd.kill_all()
