"""The run ledger: one record per training run in Redis, plus a stream of per-step reports.

- :mod:`cepo.ledger.store`: the Redis store (:class:`RunLedger`, its key layout, :class:`LedgerError`).
- :mod:`cepo.ledger.buffered`: :class:`BufferedLedger`, RunLedger's writes queued through a Redis outage (in
  memory and in ``<run_dir>/ledger_spool.jsonl``) and replayed in order when Redis is back.
- :mod:`cepo.ledger.folders`: without Redis the run folder is the record: :func:`list_run_folders` and
  :func:`read_run_folder` read ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_NNNNN`` and
  ``summary.json`` into the same shape; :func:`resolve_run` turns a run's path or id into its folder.
- :mod:`cepo.ledger.render`: rich tables of either, and ``cepo runs list/show`` (:func:`cli_list`,
  :func:`cli_show`), which work either way.
"""

from cepo.ledger.buffered import BufferedLedger
from cepo.ledger.folders import folder_steps, list_run_folders, read_run_folder, resolve_run
from cepo.ledger.render import cli_list, cli_show, run_details, runs_table
from cepo.ledger.store import CONFIG_KEY, FINAL_STATUSES, STATUSES, LedgerError, RunLedger, mask_url

__all__ = [
    "CONFIG_KEY",
    "FINAL_STATUSES",
    "STATUSES",
    "BufferedLedger",
    "LedgerError",
    "RunLedger",
    "cli_list",
    "cli_show",
    "folder_steps",
    "list_run_folders",
    "mask_url",
    "read_run_folder",
    "resolve_run",
    "run_details",
    "runs_table",
]
