"""How the package logs: one setup for the CLI's process and for every process it spawns."""

import logging


def configure_logging(verbose: bool) -> None:
    """INFO with ``verbose``, else WARNING; torch's ``is_fx_tracing`` notice (to torchrec's
    maintainers: torchrec calls it, nothing a user can act on) muted unless ``verbose``."""
    # force: an imported dependency has already given the root logger a handler, which would make basicConfig a no-op
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.NOTSET if verbose else logging.ERROR)
