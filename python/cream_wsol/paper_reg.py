"""Former home of the CREAM_Reg parts of ``cream-wsol reproduce`` (issue 9). They are stages
of the one reproduce pipeline now and live in :mod:`cream_wsol.reproduce`; this module keeps
their public names for code that imports them from here."""
from .reproduce import (METHOD_NAMES, PARTS, REPRODUCE_REGIMES, REPRODUCE_RUNS_QUICK,  # noqa: F401
                        SECTIONS_VERSION, reproduce_sections, run_reg_parts, runs_with_sections, sections_scope)

__all__ = ["run_reg_parts", "reproduce_sections", "PARTS", "METHOD_NAMES", "SECTIONS_VERSION", "runs_with_sections",
           "sections_scope"]
