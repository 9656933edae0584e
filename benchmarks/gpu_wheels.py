"""The wheels an offline GPU machine needs to run pyro_vae's suite and ``gpu_check.sh``.

    python benchmarks/gpu_wheels.py [--dest .whl] [--have benchmarks/gpu_image_packages.txt]
        [--python-version 3.12]

The GPU machine of ``gpu_check.sh`` has Python and torch but no package index. Run this where
pip reaches one: it downloads into DEST every distribution that pyro_vae's install
(pyproject.toml: its dependencies and the ``dev`` extra, which brings the pytest-xdist that
``gpu_check.sh`` runs the suite with) needs beyond those the machine holds (``--have``, one
name per line; the default lists the lent H200's image), as wheels for CPython
``--python-version`` on manylinux x86_64. Each is fetched alone (``pip download --no-deps``);
then the requirements in its metadata, with their environment markers and extras evaluated for
that target, join the queue, until every requirement is in DEST or on the machine (a name on
the machine is taken as it is: neither its version nor the extras asked of it can be checked
here). Wheels already in DEST are reused. It prints the kit; carried to the machine as
``.whl/`` in the repository, ``gpu_check.sh`` installs it and pyro_vae there before it starts.

rc 1, naming them, where a download fails, where DEST holds two versions of one
distribution (pip would refuse the whole install) or a wheel that the target cannot install
(one kit per Python version), or where a wheel in the kit does not satisfy a requirement on it.
"""

import argparse
import subprocess
import sys
import tomllib
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(5, 40)] + [
    "manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]  # glibc 2.5 to 2.39


def roots(pyproject: Path, env: dict) -> list[Requirement]:
    """pyproject's ``dependencies`` and ``dev`` extra, those whose marker holds in ``env``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = project["dependencies"] + project.get("optional-dependencies", {}).get("dev", [])
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({**env, "extra": ""})]


def target(python_version: str) -> tuple[dict, frozenset]:
    """(marker environment, wheel tags it installs) of CPython ``python_version`` (X.Y or
    X.Y.Z) on manylinux x86_64; another form: SystemExit naming it."""
    parts = python_version.split(".")
    if not (2 <= len(parts) <= 3 and all(p.isdigit() for p in parts)):
        sys.exit(f"gpu_wheels: --python-version {python_version!r}: allowed: X.Y or X.Y.Z, "
                 "e.g. 3.12")
    full = ".".join((parts + ["0"])[:3])
    env = dict(python_version=".".join(parts[:2]), python_full_version=full,
               implementation_version=full, sys_platform="linux", platform_system="Linux",
               platform_machine="x86_64", os_name="posix", implementation_name="cpython",
               platform_python_implementation="CPython", platform_release="", platform_version="")
    version = (int(parts[0]), int(parts[1]))
    tags = frozenset(cpython_tags(version, platforms=PLATFORMS)) | frozenset(
        compatible_tags(version, f"cp{parts[0]}{parts[1]}", PLATFORMS))
    return env, tags


def requirements(wheel: Path, extras: set[str], env: dict) -> list[Requirement]:
    """The requirements in ``wheel``'s METADATA that hold in ``env``, for its base install
    and each of ``extras`` (``h5netcdf[h5py]`` brings h5netcdf's ``extra == "h5py"`` lines)."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = HeaderParser().parsestr(z.read(name).decode())
    out = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e})
                                     for e in {""} | extras):
            out.append(req)
    return out


def kit_wheels(dest: Path, tags: frozenset) -> dict[str, Path]:
    """Canonical name -> the wheel for it in ``dest``. SystemExit where ``dest`` holds two
    versions of one name, or a wheel none of whose tags is in ``tags`` (the target's)."""
    kit: dict[str, Path] = {}
    for wheel in sorted(dest.glob("*.whl")):
        raw, _, _, wheel_tags = parse_wheel_filename(wheel.name)
        name = canonicalize_name(raw)
        if name in kit:
            sys.exit(f"gpu_wheels: {dest} holds two versions of {name}: {kit[name].name} and "
                     f"{wheel.name}; pip installs neither. Delete one and run again")
        if not wheel_tags & tags:
            sys.exit(f"gpu_wheels: {dest} holds {wheel.name}, which this --python-version "
                     "cannot install: one DEST per Python version (another --dest)")
        kit[name] = wheel
    return kit


def pip_download(req: Requirement, dest: Path, python_version: str) -> None:
    """One wheel for ``req`` (no dependencies) into ``dest``; a failure: SystemExit naming it."""
    plats = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", *plats,
           "-d", str(dest), f"{req.name}{req.specifier}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"gpu_wheels: no wheel of {req} for CPython {python_version} on manylinux "
                 f"x86_64 ({last})")


def resolve(todo: list[Requirement], have: set[str], dest: Path, for_target: tuple,
            download) -> tuple:
    """Fetch (``download(req)``) and follow requirements until each is in ``dest`` or
    ``have``, for ``for_target`` (:func:`target`). Returns (kit: name -> wheel, every
    (requirer, requirement) seen)."""
    env, tags = for_target
    extras_done: dict[str, set[str]] = {}  # name in the kit -> the extras followed
    edges = []
    todo = [("pyro_vae", r) for r in todo]
    while todo:
        requirer, req = todo.pop(0)
        name = canonicalize_name(req.name)
        edges.append((requirer, req))
        if name in have or (name in extras_done and extras_done[name] >= req.extras):
            continue
        kit = kit_wheels(dest, tags)
        if name not in kit:
            download(req)
            kit = kit_wheels(dest, tags)
        extras = extras_done.setdefault(name, set())
        extras |= req.extras
        todo += [(name, r) for r in requirements(kit[name], extras, env)]
    kit = kit_wheels(dest, tags)
    return {n: kit[n] for n in sorted(extras_done)}, edges


def version_conflicts(kit: dict[str, Path], edges) -> list[str]:
    """Each requirement on a kit wheel that its version does not satisfy."""
    bad = []
    for requirer, req in edges:
        wheel = kit.get(canonicalize_name(req.name))
        if wheel is not None:
            version = parse_wheel_filename(wheel.name)[1]
            if not req.specifier.contains(version, prereleases=True):
                bad.append(f"{requirer} needs {req}, the kit has {wheel.name} (put a "
                           f"matching wheel there instead: pip download --no-deps '{req}')")
    return bad


def read_have(path: Path) -> set[str]:
    """The canonical names listed in ``path``, one a line (``#`` starts a comment)."""
    if not path.is_file():
        sys.exit(f"gpu_wheels: --have {path}: no such file (one distribution name per line)")
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {canonicalize_name(line) for line in lines if line}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", type=Path, default=ROOT / ".whl")
    p.add_argument("--have", type=Path, default=ROOT / "benchmarks" / "gpu_image_packages.txt")
    p.add_argument("--python-version", default="3.12")
    args = p.parse_args(argv)
    have, tgt = read_have(args.have), target(args.python_version)
    args.dest.mkdir(parents=True, exist_ok=True)
    kit, edges = resolve(roots(ROOT / "pyproject.toml", tgt[0]), have, args.dest, tgt,
                         lambda req: pip_download(req, args.dest, args.python_version))
    extra = sorted(set(kit_wheels(args.dest, tgt[1])) - set(kit))
    mib = sum(w.stat().st_size for w in kit.values()) / 2**20
    print(f"{len(kit)} wheels, {mib:.1f} MiB, in {args.dest}:")
    for wheel in kit.values():
        print(f"  {wheel.name}")
    if extra:
        print(f"also in {args.dest}, needed by nothing here (pip installs them too): "
              + ", ".join(extra))
    bad = version_conflicts(kit, edges)
    for line in bad:
        print(f"gpu_wheels: version conflict: {line}", file=sys.stderr)
    print("carry them to the GPU machine as .whl/ in the repository: gpu_check.sh installs "
          "them and pyro_vae there")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
