"""The admission core of a pool replica: fair queue (hierarchical VTC: organizations by weight,
then their projects by weight), adaptive in-flight limit (a smoothed gradient on measured TTFT/TPOT
vs the pool's SLOs) and back-pressure that refuses on arrival what would outwait the queue
deadline; pure and clock-free, with a thin asyncio shell. See :class:`AdmissionPolicy` for the
contract."""

from serving.admission._config import AdmissionConfig, AdmissionSettings
from serving.admission._core import AdmissionCore
from serving.admission._gate import GateCore, GateSettings, GateStats
from serving.admission._interface import AdmissionPolicy
from serving.admission._shell import AdmissionRefused, AsyncAdmission
from serving.admission._types import (
    AdmissionStats,
    Admitted,
    Decision,
    LoadSnapshot,
    Queued,
    RefusalReason,
    Refused,
    TenantStats,
    merge_snapshots,
)

__all__ = [
    "AdmissionConfig",
    "AdmissionCore",
    "AdmissionPolicy",
    "AdmissionRefused",
    "AdmissionSettings",
    "AdmissionStats",
    "Admitted",
    "AsyncAdmission",
    "Decision",
    "GateCore",
    "GateSettings",
    "GateStats",
    "LoadSnapshot",
    "Queued",
    "RefusalReason",
    "Refused",
    "TenantStats",
    "merge_snapshots",
]
