"""docker/: what can be checked without a Docker engine. The compose file parses and points at
files that exist, every path the Dockerfile copies exists, and the GPU image cannot fall back to
the CPU or carry a CUDA that does not match torch's."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (DOCKER / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def env_of(instructions: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in instructions:
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def test_compose_parses_and_its_paths_exist() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    service = compose["services"]["callbridge"]
    context = (DOCKER / service["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / service["build"]["dockerfile"]).is_file()
    # The .env it reads is the user's; what goes in it is documented next to the compose file.
    assert (DOCKER / service["env_file"]).resolve() == ROOT / ".env"
    example = (DOCKER / "env.example").read_text()
    for var in ("CALLBRIDGE_PUBLIC_BASE_URL", "TWILIO_AUTH_TOKEN", "TWILIO_ACCOUNT_SID", "CALLBRIDGE_API_TOKEN"):
        assert re.search(rf"^{var}=", example, re.M), var
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    mounts = dict(v.split(":")[:2] for v in service["volumes"])
    assert (DOCKER / "../voices").resolve() == ROOT / "voices" and (ROOT / "voices").is_dir()
    env = env_of(dockerfile())
    assert env["CALLBRIDGE_VOICES_DIR"] == mounts["../voices"]
    assert env["CALLBRIDGE_MODEL"].startswith(mounts["../models"] + "/")
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert str(env["CALLBRIDGE_PORT"]) in service["ports"][0].split(":")


def test_every_path_the_dockerfile_copies_exists() -> None:
    copies = [line.split()[1:-1] for line in dockerfile() if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
    env = env_of(dockerfile())
    config = env["CALLBRIDGE_CONFIG"].removeprefix("/app/")
    assert (ROOT / config).is_file()


def test_gpu_image_requires_cuda_and_its_cuda_matches_torch() -> None:
    instructions = dockerfile()
    env = env_of(instructions)
    assert env["CALLBRIDGE_DEVICE"] == "cuda"  # the service fails at start without a GPU, never falls back
    base = next(line.split()[1] for line in instructions if line.startswith("FROM "))
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", base)
    assert cuda is not None, base
    # PyPI's torch 2.13.0 Linux wheel is built for CUDA 13.0 (it depends on cuda-toolkit 13.0.x).
    torch_pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                     if d.startswith("torch"))
    assert torch_pin == "torch==2.13.0"
    assert (cuda.group(1), cuda.group(2)) == ("13", "0")
    install = next(line for line in instructions if line.startswith("RUN pip install"))
    assert '"torch==2.13.0"' in install and "--index-url" not in install  # the default index: the CUDA build


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}`` and ``${VAR:?message}`` with ``env`` (every variable must be there)."""
    return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", lambda m: env[m.group(1)], value)


def test_cluster_compose_instances_redis_and_tls_proxy_fit_together() -> None:
    """docker/compose.cluster.yaml: each GPU instance is the one image on its own GPU, with a unique
    id, an internal URL naming its own service, and a public URL that the Caddyfile routes back to
    that service; Redis is shared and not published; only the TLS proxy is published; every
    instance's environment passes the service's own settings check."""
    from callbridge.config import load_settings

    compose = yaml.safe_load((DOCKER / "compose.cluster.yaml").read_text())
    services = compose["services"]
    instances = {name: s for name, s in services.items() if "build" in s}
    assert len(instances) >= 2 and set(services) == {*instances, "redis", "caddy"}
    caddyfile = (DOCKER / "Caddyfile.cluster").read_text()
    caddy = services["caddy"]
    assert sorted(caddy["ports"]) == ["443:443", "80:80"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in caddy["volumes"]}
    assert mounted["./Caddyfile.cluster"] == "/etc/caddy/Caddyfile" and (DOCKER / "Caddyfile.cluster").is_file()
    assert "ports" not in services["redis"] and "--save" in services["redis"]["command"]
    env_example = (DOCKER / "env.example").read_text()
    for var in ("CALLBRIDGE_DOMAIN", "REDIS_PASSWORD"):
        assert re.search(rf"^# {var}=", env_example, re.M), var
    dotenv = {"CALLBRIDGE_DOMAIN": "bridge.example.com", "REDIS_PASSWORD": "pw"}
    gpus, ids = [], set()
    for name, service in instances.items():
        assert (DOCKER / service["build"]["context"]).resolve() == ROOT
        assert service["build"]["dockerfile"] == "docker/Dockerfile" and "ports" not in service
        assert "redis" in service["depends_on"]
        device = service["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
        env = {k: _interpolate(str(v), dotenv) for k, v in service["environment"].items()}
        env.update(TWILIO_AUTH_TOKEN="t", CALLBRIDGE_API_TOKEN="a")  # what .env adds
        settings = load_settings(ROOT / "config" / "callbridge.toml", env=env)
        c = settings.cluster
        assert c.enabled and c.redis_url.endswith("@redis:6379/0")
        assert c.internal_url == f"http://{name}:{env_of(dockerfile())['CALLBRIDGE_PORT']}"
        ids.add(c.instance_id)
        # The stream URL Twilio gets comes back to this service, the prefix stripped.
        prefix = c.public_url.removeprefix(settings.server.public_base_url)
        assert prefix == f"/i/{name}"
        assert re.search(rf"handle_path {re.escape(prefix)}/\* {{\s*reverse_proxy {name}:8080\s*}}", caddyfile), name
    assert len(ids) == len(instances) and len(set(gpus)) == len(gpus)  # one GPU each, ids unique
    balanced = re.search(r"handle {\s*reverse_proxy ([^{\n]+){", caddyfile)
    assert balanced is not None and set(balanced.group(1).split()) == {f"{n}:8080" for n in instances}
    assert "health_uri /healthz" in caddyfile
