"""YAML profiles named by file: `NAME` means DIRECTORY/NAME.yaml, anything with a suffix is a path.
The placement profiles (services/router/placement/profiles) and the simulator's cost profiles
(sim/profiles) are both found this way."""

import pathlib

import yaml


def read_profile(name_or_path: str, directory: pathlib.Path, kind: str) -> tuple[str, dict]:
    """(name, spec) of a profile: the file's `name:` if it has one, else its stem. An unknown name
    raises ValueError listing the known ones."""
    path = pathlib.Path(name_or_path)
    if not path.suffix:
        path = directory / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in directory.glob("*.yaml"))
        raise ValueError(f"unknown {kind} profile {name_or_path!r}; known: {', '.join(known)} (or a YAML path)")
    spec = yaml.safe_load(path.read_text())
    return spec.get("name", path.stem), spec
