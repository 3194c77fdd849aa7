"""The controller: runs Algorithm 1 over the services (``trainer``), with the service pools it drives
(``pools``), the run's Ray cluster and engine settings (``cluster``) and the step recorder (``recorder``)."""

from cepo.controller.trainer import RunInterrupted, Trainer

__all__ = ["RunInterrupted", "Trainer"]
