"""gateway/: the API process (docs/architecture.md, "Which process runs which folder")."""
import importlib.metadata


def version() -> str:
    """kvgate's version, as installed ("0+unknown" run from a checkout that is not)."""
    try:
        return importlib.metadata.version("kvgate")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
