"""The training image's tag is the version of the code it holds: `<project version>-<first 12
hex of image_version()>`, a hash over exactly the files `pip install .` ships of the project's
packages. The same code gives the same tag wherever it is computed: from a source checkout
(`make image` tags the build with it), from the package installed in the image (its build
fails if the two differ), and from an in-cluster launcher running that image (its Jobs ask
for that tag). A code change is a new tag, so a cluster never runs stale code under an old
name.

Light on purpose (stdlib only, nothing of the project imported): the Makefile calls it
before anything is built, and the executor calls it per Job.
"""

import hashlib
import importlib.metadata
import importlib.util
import re
from fnmatch import fnmatchcase
from pathlib import Path

DISTRIBUTION = "vsgd-repro"  # [project] name in pyproject.toml
DEFAULT_REPOSITORY = "vsgd-repro"
# The importable packages the distribution ships ([tool.setuptools.packages.find] include;
# tests/test_image.py checks the two agree).
PACKAGES = ("vsgd", "pipeline")
TAG_LENGTH = 12
BYTECODE = (".pyc", ".pyo")

_IMPORTED: list = []  # image_version() of the imported packages, once computed


def image_version(root=None) -> str:
    """sha256 (hex) over the shipped files of `PACKAGES` under `root` (the directory that
    holds them: a source checkout or a site-packages), sorted by relative path; each path is
    hashed with its contents, so a rename is a new version. Default: where the packages are
    imported from."""
    # The imported code does not change while a process runs: hash it once (the executor
    # asks per Job). An explicit root is hashed every time (tests change trees).
    if root is None and _IMPORTED:
        return _IMPORTED[0]
    digest = hashlib.sha256()
    for base, path in sorted(shipped_files(root), key=lambda f: f[1]):
        digest.update(path.encode() + b"\0")
        digest.update((base / path).read_bytes() + b"\0")
    if root is None:
        _IMPORTED.append(digest.hexdigest())
    return digest.hexdigest()


def shipped_files(root=None) -> list[tuple[Path, str]]:
    """(directory holding the package, relative posix path) of every file `pip install .`
    installs of `PACKAGES`. In a source tree (a pyproject.toml next to the packages) that is
    setuptools' choice: the modules of every package directory (one with __init__.py,
    reached through package directories) and the package-data patterns, so a stray file of
    the checkout changes nothing; in an installed tree, every file but bytecode."""
    files = []
    for package in PACKAGES:
        base = Path(root) if root is not None else _location(package)
        pyproject = base / "pyproject.toml"
        if pyproject.is_file():
            found = _source_files(base, package, _package_data(pyproject))
        else:
            found = {
                p.relative_to(base).as_posix()
                for p in (base / package).rglob("*")
                if p.is_file() and p.suffix not in BYTECODE and "__pycache__" not in p.parts
            }
        files += [(base, path) for path in found]
    return files


def project_version(root=None) -> str:
    """The project's version: a source tree's own pyproject.toml (an editable install's
    metadata can be older than the checkout), else the installed distribution's metadata."""
    base = Path(root) if root is not None else _location(PACKAGES[0])
    pyproject = base / "pyproject.toml"
    if pyproject.is_file():
        project = _toml(pyproject).get("project", {})
        if project.get("name") == DISTRIBUTION and project.get("version"):
            return project["version"]
    return importlib.metadata.version(DISTRIBUTION)


def image_tag(root=None) -> str:
    """`<project version>-<first 12 hex of image_version()>`, a valid image tag."""
    # Tags allow [A-Za-z0-9_.-]; a PEP 440 local version's "+" is not among them.
    version = re.sub(r"[^A-Za-z0-9_.-]", "-", project_version(root))
    return f"{version}-{image_version(root)[:TAG_LENGTH]}"


def image_ref(repository=None, root=None) -> str:
    """`<repository or DEFAULT_REPOSITORY>:<image_tag()>`."""
    return f"{repository or DEFAULT_REPOSITORY}:{image_tag(root)}"


def _location(package) -> Path:
    """The directory holding `package`, found without importing it (vsgd imports torch)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise RuntimeError(
            f"package {package!r} not found: install the project "
            f"({DISTRIBUTION}) or run from its checkout"
        )
    return Path(spec.origin).resolve().parent.parent


def _toml(path):
    import tomllib  # stdlib from Python 3.11 on; only source trees need it

    return tomllib.loads(Path(path).read_text())


def _package_data(pyproject) -> dict:
    return _toml(pyproject).get("tool", {}).get("setuptools", {}).get("package-data", {})


def _source_files(base, package, package_data) -> set[str]:
    files = set()
    pending = [base / package]
    while pending:
        directory = pending.pop()
        if not (directory / "__init__.py").is_file():
            continue
        dotted = directory.relative_to(base).as_posix().replace("/", ".")
        files |= {p.relative_to(base).as_posix() for p in directory.glob("*.py") if p.is_file()}
        for key, patterns in package_data.items():
            if key in ("", "*") or fnmatchcase(dotted, key):
                files |= {
                    p.relative_to(base).as_posix()
                    for pattern in patterns
                    for p in directory.glob(pattern)
                    if p.is_file()
                }
        pending += [d for d in directory.iterdir() if d.is_dir() and d.name != "__pycache__"]
    return files


# -- `python -m pipeline image` --------------------------------------------------------------


def add_arguments(parser):
    parser.add_argument(
        "--repository",
        default=None,
        help=f"image repository, e.g. registry.example.com/vsgd-repro "
        f"(default: {DEFAULT_REPOSITORY}, a local name as on kind)",
    )
    parser.add_argument(
        "--tag", action="store_true", help="print only the tag (<project version>-<code hash>)"
    )


def run(args) -> int:
    """Print the training image's reference for this code: what `make image` builds and
    what the kubernetes executor runs unless executor.kubernetes.image is set."""
    print(image_tag() if args.tag else image_ref(args.repository))
    return 0
