"""The ``verl.plugins`` entry point: importing it registers respec, and says so loudly when that fails.

verl loads entry points inside ``import verl`` and logs their errors only at DEBUG level, which would turn a
broken install into a puzzling "Rollout respec not found" much later; so the failure is logged as an error
with its traceback (and re-raised) here.
"""

import logging

from respec_plugin import register

try:
    register()
except Exception:
    logging.getLogger("respec_plugin").exception(
        "respec-plugin failed to register with verl; rollout.name=respec will not be available"
    )
    raise
