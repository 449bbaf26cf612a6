"""``python -m services.dicom [--flags]``: run the DICOM front door (Storage SCP + results sender; ``--help``)."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence

from services.dicom.settings import SettingsError, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    """Read settings (fail fast), run the server until SIGTERM/SIGINT. Returns the process exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO/DEBUG lines name SOP instances
    # pydicom and highdicom warn about odd values by quoting them (a patient's name, say): never in our logs
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    for module in (r"pydicom\.", r"highdicom\."):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except SettingsError as e:
        logging.getLogger("services.dicom").error("%s", e)
        return 2
    from services.dicom.server import serve  # after the settings are known to be valid

    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
