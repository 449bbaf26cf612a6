"""``python -m services.ingestion [--flags]``: run the ingestion gRPC service (flags: ``--help``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from services.ingestion.settings import SettingsError, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    """Read settings (fail fast), run the server until SIGTERM/SIGINT. Returns the process exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except SettingsError as e:
        logging.getLogger("services.ingestion").error("%s", e)
        return 2
    from services.ingestion.server import serve  # after the settings are known to be valid

    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
