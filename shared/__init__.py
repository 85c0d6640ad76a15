"""lm-compose library: interventions, evaluation, metrics, storage, models and data.

Every KFP component is a thin wrapper over an entry point in this package.
Nothing here imports KFP, so the library is usable (and testable) on its own.
"""

__version__ = "0.1.0"
