"""A Docker engine, Compose v2 and the images the compose test needs, all made without a registry.

- The engine is Debian's `docker.io`, installed with apt when `dockerd` is missing.
- Compose v2 (>= 2.24, which the compose file needs) is Debian 13's `docker-compose` package:
  when `docker compose version` is older or absent, its .deb is downloaded with apt from a private
  trixie source list (the system's apt configuration is not touched) and its one binary is placed
  in /usr/local/lib/docker/cli-plugins, where any docker client looks for plugins.
- If an engine already answers on the default socket it is used as it is; otherwise a private
  `dockerd` is started with its own data root, exec root, socket and pidfile, and stopped by PID.
  Its data root is kept between runs, so the images below are built once (cold) and found by
  tag afterwards (warm).
- Images: the Dockerfile's FROM (`python:3.11-slim-bookworm`) is an `mmdebstrap bookworm` (the
  faster debootstrap) with Python 3.11, imported with `docker import`; `prom/prometheus` and
  `prom/alertmanager` are stand-ins holding Debian's binaries (Prometheus 2.42 and Alertmanager 0.25, older than the
  compose file's 2.53.2 and 0.27.0), tagged with the compose file's names and labelled as such.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from tests.support import ROOT, wait_until

STATE = Path(os.environ.get("MODEL_STORAGE_CI_STATE", "/var/lib/model-storage-ci"))
RUN_DIR = Path("/run/model-storage-ci")
SOCKET = RUN_DIR / "docker.sock"
DEFAULT_SOCKET = Path("/var/run/docker.sock")
PLUGIN = Path("/usr/local/lib/docker/cli-plugins/docker-compose")
MIRROR = "http://deb.debian.org/debian"
COMPOSE_MINIMUM = (2, 24)
APT_TIMEOUT = ["-o", "DPkg::Lock::Timeout=600"]
STAND_IN_LABEL = "org.opencontainers.image.description"
# Raised when the stand-ins' content changes, so cached ones are rebuilt.
REVISION_LABEL = "model-storage.stand-in-revision"
STAND_IN_REVISION = "2"


def log(message: str) -> None:
    print(f"[compose-engine] {message}", flush=True)


def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 600, **kwargs: object) -> str:
    """Run a command, fail with its output if it fails, return its stdout."""
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:4])} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return str(done.stdout)


def apt_install(*packages: str) -> None:
    log(f"apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", *APT_TIMEOUT, "update", "-qq", env=env)
    run("apt-get", *APT_TIMEOUT, "install", "-y", "-qq", "--no-install-recommends", *packages, env=env)


def ensure_packages() -> None:
    """Debian's engine and mmdebstrap, installed when missing."""
    missing = [
        pkg for binary, pkg in (("dockerd", "docker.io"), ("mmdebstrap", "mmdebstrap")) if not shutil.which(binary)
    ]
    if missing:
        apt_install(*missing)


def compose_version(env: dict[str, str]) -> tuple[int, int] | None:
    done = subprocess.run(
        ["docker", "compose", "version", "--short"], capture_output=True, text=True, env=env, check=False
    )
    match = re.match(r"v?(\d+)\.(\d+)", done.stdout.strip())
    return (int(match[1]), int(match[2])) if done.returncode == 0 and match else None


def ensure_compose(env: dict[str, str]) -> str:
    """`docker compose` >= 2.24, installed from Debian 13's docker-compose package when older or absent."""
    version = compose_version(env)
    if version is not None and version >= COMPOSE_MINIMUM:
        return ".".join(map(str, version))
    log(f"docker compose is {version or 'absent'}; installing Debian 13's docker-compose plugin")
    apt_dir = STATE / "apt-trixie"
    for sub in ("lists/partial", "cache", "archives/partial"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    sources = apt_dir / "sources.list"
    sources.write_text(f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} trixie main\n")
    options = [
        f"-oDir::Etc::SourceList={sources}",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={apt_dir / 'lists'}",
        f"-oDir::Cache={apt_dir / 'cache'}",
        f"-oDir::Cache::Archives={apt_dir / 'archives'}",
        "-oAPT::Sandbox::User=root",
    ]
    run("apt-get", *options, "update", "-qq")
    run("apt-get", *options, "download", "docker-compose", cwd=apt_dir)
    (deb,) = sorted(apt_dir.glob("docker-compose_*.deb"))
    with tempfile.TemporaryDirectory() as tmp:
        run("dpkg-deb", "-x", str(deb), tmp)
        PLUGIN.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(tmp) / "usr/libexec/docker/cli-plugins/docker-compose", PLUGIN)
    version = compose_version(env)
    assert version is not None and version >= COMPOSE_MINIMUM, f"docker compose still {version} after installing"
    return ".".join(map(str, version))


def engine_answers(socket: Path) -> bool:
    if not socket.exists():
        return False
    done = subprocess.run(
        ["docker", "-H", f"unix://{socket}", "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return done.returncode == 0


@contextlib.contextmanager
def engine() -> Iterator[dict[str, str]]:
    """An environment whose DOCKER_HOST answers: the running engine if there is one, else our own dockerd."""
    ensure_packages()
    if engine_answers(DEFAULT_SOCKET):
        log(f"using the engine already running at {DEFAULT_SOCKET}")
        yield {**os.environ, "DOCKER_HOST": f"unix://{DEFAULT_SOCKET}"}
        return
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    (STATE / "docker").mkdir(parents=True, exist_ok=True)
    log_path = STATE / "dockerd.log"
    argv = [
        "dockerd",
        f"--data-root={STATE / 'docker'}",
        f"--exec-root={RUN_DIR / 'exec'}",
        f"--pidfile={RUN_DIR / 'dockerd.pid'}",
        f"--host=unix://{SOCKET}",
    ]
    with log_path.open("ab") as out:
        daemon = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(
            lambda: daemon.poll() is None and engine_answers(SOCKET),
            timeout=90,
            interval=0.2,
            what=f"dockerd to answer on {SOCKET} (log: {log_path})",
        )
        log(f"started dockerd pid {daemon.pid} on {SOCKET}")
        yield {**os.environ, "DOCKER_HOST": f"unix://{SOCKET}"}
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=30)
        log(f"dockerd pid {daemon.pid} stopped")


def has_image(tag: str, env: dict[str, str], revision: str | None = None) -> bool:
    done = subprocess.run(
        ["docker", "image", "inspect", "--format", f'{{{{index .Config.Labels "{REVISION_LABEL}"}}}}', tag],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    return done.returncode == 0 and (revision is None or done.stdout.strip() == revision)


def base_image_tag() -> str:
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "the Dockerfile declares no ARG PYTHON_IMAGE=... default"
    return match[1]


def compose_image(service: str) -> str:
    image: str = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][service]["image"]
    return image


def build_base_image(tag: str, env: dict[str, str]) -> None:
    """A Debian 12 root filesystem with Python 3.11 (venv, pip wheel, CA certificates) as `tag`.

    mmdebstrap rather than debootstrap: it downloads in parallel through apt and, with dpkg's
    unsafe-io (nothing here needs fsync), took 107 s where debootstrap took 230 s on a loaded machine.
    """
    log(f"mmdebstrap bookworm for {tag}")
    mmdebstrap = subprocess.Popen(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--dpkgopt=force-unsafe-io",
            "--aptopt=Acquire::Languages none",
            "--include=python3,python3-venv,python-is-python3,ca-certificates",
            "bookworm",
            "-",
            MIRROR,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    run(
        "docker",
        "import",
        "--change",
        'CMD ["python3"]',
        "--message",
        "mmdebstrap bookworm with python3.11: a local stand-in for the python image",
        "-",
        tag,
        env=env,
        stdin=mmdebstrap.stdout,
        timeout=1200,
    )
    assert mmdebstrap.wait(timeout=60) == 0, "mmdebstrap failed (rerun it by hand to see why)"


def build_stand_in(tag: str, binary: str, entrypoint: str, data: str, base: str, env: dict[str, str]) -> None:
    """`tag` holding Debian's `binary` at `entrypoint`, as the upstream image's is, and the package's `data` dir."""
    source = shutil.which(binary)
    assert source, f"{binary} is not installed (make system-deps)"
    said = subprocess.run([source, "--version"], capture_output=True, text=True, check=False)
    version = ((said.stdout + said.stderr).strip().splitlines() or ["version unknown"])[0][:80]
    log(f"stand-in {tag} from Debian's {binary}: {version}")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(source, Path(tmp) / "binary")
        shutil.copytree(data, Path(tmp) / "data", symlinks=True)
        description = f"local stand-in for {tag}: Debian's {binary} ({version})"
        (Path(tmp) / "Dockerfile").write_text(
            f"FROM {base}\n"
            f"COPY binary {entrypoint}\n"
            f"COPY data {data}\n"
            f'LABEL {STAND_IN_LABEL}="{description}" {REVISION_LABEL}="{STAND_IN_REVISION}"\n'
            "USER 65534:65534\n"
            f'ENTRYPOINT ["{entrypoint}"]\n'
        )
        run("docker", "build", "-q", "-t", tag, tmp, env={**env, "DOCKER_BUILDKIT": "0"})


def ensure_images(env: dict[str, str]) -> dict[str, float]:
    """The base and stand-in images, each built only if its tag is missing; seconds spent on each."""
    spent: dict[str, float] = {}
    base = base_image_tag()
    wanted: list[tuple[str, Callable[[], None]]] = [
        (base, lambda: build_base_image(base, env)),
        (
            compose_image("prometheus"),
            lambda: build_stand_in(
                compose_image("prometheus"), "prometheus", "/bin/prometheus", "/usr/share/prometheus/web", base, env
            ),
        ),
        (
            compose_image("alertmanager"),
            lambda: build_stand_in(
                compose_image("alertmanager"),
                "prometheus-alertmanager",
                "/bin/alertmanager",
                "/usr/share/prometheus/alertmanager",
                base,
                env,
            ),
        ),
    ]
    for tag, build in wanted:
        started = time.monotonic()
        revision = STAND_IN_REVISION if tag != base else None
        if has_image(tag, env, revision):
            log(f"{tag}: cached")
        else:
            build()
        spent[tag] = round(time.monotonic() - started, 1)
    return spent


if __name__ == "__main__":
    # `python -m tests.compose_engine`: prepare the engine and images (what the test's cold start does).
    STATE.mkdir(parents=True, exist_ok=True)
    with engine() as environment:
        print(ensure_compose(environment), ensure_images(environment))
