"""The training image's tag is the code it holds (pipeline/image.py): the same from the
checkout (`make image`) and from the package installed in the image (its build-time check,
an in-cluster launcher), blind to what is not shipped, changed by anything that is. The
Dockerfile's check and the Makefile's targets are replayed here; the image itself is not
built (no container engine where the tests run).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from pipeline import image

ROOT = Path(__file__).resolve().parents[1]
# Docker's tag grammar: [\w][\w.-]{0,127}
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def source_copy(tmp_path):
    """What the Docker build context holds of the code, as a fresh tree (a snapshot: others
    may edit the checkout while the tests run)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in image.PACKAGES:
        shutil.copytree(
            ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return src


@pytest.fixture(scope="module")
def built(project_wheel, installed_project):
    """(source tree, the wheel built from it installed non-editable into a directory of its
    own, as in the image): tests/conftest.py's, built and installed once per session (the
    wheel tests/test_packaging.py checks), so that the two trees are the same code."""
    return project_wheel[0], installed_project


def in_installed(installed, *args, code=None, env=None, cwd):
    command = [sys.executable, *(("-c", code) if code else args)]
    proc = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1", **(env or {})},
    )
    return proc


def test_installed_package_computes_the_tag_the_checkout_built(built, tmp_path):
    """An in-cluster launcher running the image asks for the image it runs in."""
    src, installed = built
    probe = (
        "import json, pipeline, pipeline.image as i; print(json.dumps({'file': "
        "pipeline.__file__, 'version': i.image_version(), 'tag': i.image_tag()}))"
    )
    proc = in_installed(installed, code=probe, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["file"]).is_relative_to(installed), found  # not the checkout
    assert found["version"] == image.image_version(src)
    assert found["tag"] == image.image_tag(src)
    cli = in_installed(
        installed,
        "-m",
        "pipeline",
        "image",
        "--repository",
        "registry.example.com/vsgd-repro",
        cwd=tmp_path,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == f"registry.example.com/vsgd-repro:{image.image_tag(src)}"


def test_installed_tree_hashes_every_shipped_file(built):
    """The two ways of listing the files agree: setuptools' choice in the source tree, what
    is on disk in the installed one."""
    src, installed = built
    source = {path for _, path in image.shipped_files(src)}
    assert source == {path for _, path in image.shipped_files(installed)}
    assert "pipeline/templates/job-template.yaml" in source
    assert "pipeline/reference_results.yaml" in source
    assert "vsgd/data/formats.py" in source and "pipeline/image.py" in source


def test_stray_files_in_the_checkout_do_not_change_the_tag(tmp_path):
    """Files `pip install .` does not ship (notes, bytecode, a script outside any package)
    are not in the image: counting them would fail its build-time check."""
    src = source_copy(tmp_path)
    before = image.image_version(src)
    (src / "pipeline" / "notes.txt").write_text("todo\n")
    (src / "pipeline" / "templates" / "scratch.py").write_text("print('not a module')\n")
    (src / "vsgd" / "__pycache__").mkdir(exist_ok=True)
    (src / "vsgd" / "__pycache__" / "spec.cpython-311.pyc").write_bytes(b"\0")
    (src / "scratch").mkdir()
    (src / "scratch" / "x.py").write_text("")
    assert image.image_version(src) == before


@pytest.mark.parametrize(
    "change", ["module", "template", "rename", "new module", "optimizer package"]
)
def test_any_shipped_change_is_a_new_tag(tmp_path, change):
    src = source_copy(tmp_path)
    before = image.image_tag(src)
    if change == "module":
        with open(src / "vsgd" / "optim.py", "a") as f:
            f.write("\n# changed\n")
    elif change == "template":
        with open(src / "pipeline" / "templates" / "job-template.yaml", "a") as f:
            f.write("# changed\n")
    elif change == "rename":
        (src / "pipeline" / "redact.py").rename(src / "pipeline" / "redaction.py")
    elif change == "optimizer package":  # the image installs what this file lists
        with open(src / "pipeline" / "requirements-optimizers.txt", "a") as f:
            f.write("pytorch_optimizer==4.1.0\n")
    else:
        (src / "vsgd" / "models" / "extra.py").write_text("")
    after = image.image_tag(src)
    assert after != before and after.split("-")[0] == before.split("-")[0]


def test_hashed_packages_are_the_packages_pyproject_ships():
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(include) == sorted(f"{p}*" for p in image.PACKAGES)
    assert pyproject()["project"]["name"] == image.DISTRIBUTION


def test_tag_is_a_valid_image_tag_of_the_project_version():
    tag = image.image_tag()
    assert TAG.match(tag), tag
    version = pyproject()["project"]["version"]
    assert tag == f"{version}-{image.image_version()[:12]}"
    assert image.image_ref() == f"vsgd-repro:{tag}" and image.DEFAULT_REPOSITORY == "vsgd-repro"
    assert (
        image.image_ref("registry.example.com/team/vsgd") == f"registry.example.com/team/vsgd:{tag}"
    )


def test_cli_prints_the_reference_or_only_the_tag(capsys):
    from pipeline.__main__ import main

    assert main(["image"]) == 0
    assert capsys.readouterr().out.strip() == image.image_ref()
    assert main(["image", "--repository", "registry.example.com/vsgd-repro"]) == 0
    assert capsys.readouterr().out.strip() == image.image_ref("registry.example.com/vsgd-repro")
    assert main(["image", "--tag"]) == 0
    assert capsys.readouterr().out.strip() == image.image_tag()


# -- the Makefile ----------------------------------------------------------------------------

FAKE_GIT = """#!/bin/sh
case "$1" in
  rev-parse) echo 0123456789abcdef0123456789abcdef01234567 ;;
  status) printf '%s' "$FAKE_GIT_STATUS" ;;
esac
"""


def make_dry_run(tmp_path, *args, status=""):
    """`make -n ...` with a stand-in git (the test must not touch the repository's)."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "git").write_text(FAKE_GIT)
    (bin_dir / "git").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_GIT_STATUS": status,
    }
    proc = subprocess.run(
        ["make", "-n", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.replace("\\\n", " ")


def recipe_line(output, command):
    [line] = [text for text in output.splitlines() if text.split()[:2] == command]
    return line.split()


def test_make_image_builds_the_tag_of_this_code(tmp_path):
    out = make_dry_run(
        tmp_path, "image", "REGISTRY=registry.example.com/", status=" M pipeline/image.py\n"
    )
    build = recipe_line(out, ["docker", "build"])
    tag = image.image_tag(ROOT)  # now, not cached: others may edit the checkout meanwhile
    assert build[build.index("-t") + 1] == f"registry.example.com/vsgd-repro:{tag}"
    assert f"IMAGE_TAG={tag}" in build
    # Uncommitted changes: the content hash is the tag, the commit says it is not the commit.
    assert "GIT_COMMIT=0123456789abcdef0123456789abcdef01234567-dirty" in build
    assert build[-1] == "."


def test_make_image_records_a_clean_commit_and_works_with_other_engines(tmp_path):
    out = make_dry_run(tmp_path, "push", "DOCKER=podman")
    ref = image.image_ref(root=ROOT)
    build = recipe_line(out, ["podman", "build"])
    assert "GIT_COMMIT=0123456789abcdef0123456789abcdef01234567" in build
    assert build[build.index("-t") + 1] == ref == f"vsgd-repro:{image.image_tag(ROOT)}"  # kind
    assert recipe_line(out, ["podman", "push"]) == ["podman", "push", ref]
    assert f"echo {image.image_ref(root=ROOT)}" in make_dry_run(tmp_path, "image-ref")


# -- the Dockerfile --------------------------------------------------------------------------


def dockerfile_instructions():
    """(instruction, arguments) of the Dockerfile, continuation lines joined as Docker does."""
    text = re.sub(r"\\\n", "", (ROOT / "Dockerfile").read_text())
    return [
        tuple(line.split(None, 1))
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def build_check():
    """The Python code of the Dockerfile's build-time check."""
    [run] = [
        args
        for op, args in dockerfile_instructions()
        if op == "RUN" and "pip install --no-deps ." in args
    ]
    code = re.search(r'python -c "(.*)"\s*$', run)
    assert code and "\\" not in code[1] and "$" not in code[1], run  # no shell escapes
    return code[1]


def test_dockerfile_check_fails_a_build_from_another_tree(built, tmp_path):
    """IMAGE_TAG names the code: an image built from a tree other than the one the tag was
    computed from must not be built at all."""
    src, installed = built
    code = build_check()
    good = in_installed(
        installed, code=code, cwd=tmp_path, env={"VSGD_IMAGE_TAG": image.image_tag(src)}
    )
    assert good.returncode == 0, good.stderr
    assert image.image_tag(src) in good.stdout
    bad = in_installed(
        installed, code=code, cwd=tmp_path, env={"VSGD_IMAGE_TAG": "0.1.0-000000000000"}
    )
    assert bad.returncode != 0 and "not IMAGE_TAG 0.1.0-000000000000" in bad.stderr


def test_dockerfile_passes_the_build_args_to_the_image():
    instructions = dockerfile_instructions()
    args = {a.split("=")[0] for op, a in instructions if op == "ARG"}
    assert {"GIT_COMMIT", "IMAGE_TAG"} <= args
    env = " ".join(a for op, a in instructions if op == "ENV")
    assert "VSGD_GIT_COMMIT=$GIT_COMMIT" in env and "VSGD_IMAGE_TAG=$IMAGE_TAG" in env


def dockerignore_excludes(path):
    """Whether .dockerignore keeps `path` out of the build context: the last matching rule
    wins, `!` re-includes, a rule matches a path or any directory above it."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerfile_copies_only_what_the_build_context_holds():
    """A COPY of a file .dockerignore leaves out fails the build ("not found")."""
    sources = [
        src
        for op, args in dockerfile_instructions()
        if op == "COPY"
        for src in args.split()[:-1]
        if not src.startswith("--")
    ]
    assert {"dvc.yaml", "params.yaml", "vsgd", "pipeline"} <= set(sources)
    missing = [src for src in sources if dockerignore_excludes(src)]
    assert not missing, f".dockerignore leaves out what the Dockerfile copies: {missing}"


def test_the_image_installs_the_listed_optimizer_packages_and_only_those(tmp_path):
    """The Dockerfile's step for pipeline/requirements-optimizers.txt, replayed with a
    stand-in `python` that records what pip would install: nothing for the shipped file (only
    comments), the listed packages with the lock's pins once one is added."""
    [run] = [
        a
        for op, a in dockerfile_instructions()
        if op == "RUN" and "requirements-optimizers.txt" in a
    ]
    step = run.split(" && python -m pip install --no-deps")[0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    (bin_dir / "python").chmod(0o755)
    (tmp_path / "pipeline").mkdir()
    listed = tmp_path / "pipeline" / "requirements-optimizers.txt"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}

    def replay():
        (tmp_path / "calls").unlink(missing_ok=True)
        subprocess.run(["sh", "-c", step], cwd=tmp_path, env=env, check=True)
        return (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""

    listed.write_text((ROOT / "pipeline" / "requirements-optimizers.txt").read_text())
    assert replay() == ""
    listed.write_text(listed.read_text() + "pytorch_optimizer==4.1.0\n")
    assert replay() == (
        "-m pip install -c /app/requirements.lock -r pipeline/requirements-optimizers.txt\n"
    )


# -- the C toolchain torch.compile needs ------------------------------------------------------


def run_index(marker):
    """(index among the instructions, arguments) of the one RUN whose arguments hold `marker`."""
    [(index, args)] = [
        (i, args)
        for i, (op, args) in enumerate(dockerfile_instructions())
        if op == "RUN" and marker in args
    ]
    return index, args


def test_the_image_installs_a_c_toolchain_as_root_and_cleans_up_after_apt():
    """Triton compiles its launcher with the first compiled CUDA step: a `-runtime` base
    without gcc fails there, hours into a grid, not at build time."""
    instructions = dockerfile_instructions()
    index, run = run_index("apt-get install")
    install = run.split("apt-get install", 1)[1].split("&&")[0].split()
    assert "--no-install-recommends" in install and "-y" in install
    assert "g++" in install  # brings gcc and, through libstdc++'s headers, libc's
    assert run.index("apt-get update") < run.index("apt-get install")
    assert run.rstrip().endswith("rm -rf /var/lib/apt/lists/*")  # no package lists kept
    users = [i for i, (op, _) in enumerate(instructions) if op == "USER"]
    assert users and index < users[0]  # apt needs root


@pytest.mark.parametrize("python_headers", [True, False])
def test_the_toolchain_step_adds_python_headers_only_where_missing(tmp_path, python_headers):
    """The step replayed with a stand-in apt-get: g++ always; python3-dev only when the
    interpreter's include directory has no Python.h (Triton's launcher includes it)."""
    _, run = run_index("apt-get install")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "stale").write_text("")
    step = run.replace("/var/lib/apt/lists/", f"{lists}/")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    include = tmp_path / "include"
    include.mkdir()
    if python_headers:
        (include / "Python.h").write_text("")
    # A stand-in interpreter that answers the step's include-directory question.
    (bin_dir / "python").write_text(f"#!/bin/sh\necho {include}\n")
    for tool in ("apt-get", "python"):
        (bin_dir / tool).chmod(0o755)
    subprocess.run(
        ["sh", "-c", step], cwd=tmp_path, env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, check=True
    )
    install = "install -y --no-install-recommends g++"
    expected = ["update", install if python_headers else f"{install} python3-dev"]
    assert (tmp_path / "calls").read_text().splitlines() == expected
    assert not list(lists.iterdir())


def test_the_include_directory_the_step_asks_for_is_the_one_triton_compiles_with():
    """The step's own question, asked of this interpreter, names the directory Triton's
    build passes to the compiler (its `posix_local` -> `posix_prefix` rule)."""
    import sysconfig

    _, run = run_index("apt-get install")
    [question] = re.findall(r'headers=\$\(python -c "(.*?)"\)', run)
    asked = subprocess.run(
        [sys.executable, "-c", question], capture_output=True, text=True, check=True
    ).stdout.strip()
    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme
    assert asked == sysconfig.get_paths(scheme=scheme)["include"]
    assert (Path(asked) / "Python.h").is_file()  # Triton built its launchers here with it


def toolchain_check():
    """The Python code of the Dockerfile's toolchain check."""
    _, run = run_index("compile_so_from_src")
    code = re.search(r'python -c "(.*)"\s+&& rm -rf /tmp/toolchain-check', run)
    assert code and "\\" not in code[1] and "$" not in code[1], run  # no shell escapes
    return code[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "missing",
    # The passing case compiles with both compilers (about 25 s on 2 cores): extended; the
    # failing cases, which stop before compiling, keep the check able to fail by default.
    [pytest.param(None, marks=pytest.mark.extended), "CC", "CXX"],
)
def test_the_toolchain_check_fails_a_build_without_a_compiler(tmp_path, missing):
    """The check replayed here (which has gcc and g++): it passes, and it fails the build
    when Triton's C compiler (CC) or inductor's C++ compiler (CXX) is not there."""
    env = {
        **os.environ,
        "TRITON_CACHE_DIR": str(tmp_path / "cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    if missing:
        env[missing] = str(tmp_path / "no-such-compiler")
    proc = subprocess.run(
        [sys.executable, "-c", toolchain_check()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if missing is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "torch.compile runs on CPU" in proc.stdout
    else:
        assert proc.returncode != 0 and "no-such-compiler" in proc.stderr, proc.stderr[-3000:]
