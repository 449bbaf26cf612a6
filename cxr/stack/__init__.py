"""Start, stop and inspect the local stack (redis-server, TorchServe, ingestion, explanation worker) without
Docker. No torch is imported here. Entry points: :func:`up`, :func:`down`, :func:`stack_status`."""

from cxr.stack.errors import BadSettingError, ModelDirError, PortInUseError, ServiceStartError, StackError
from cxr.stack.settings import SERVICES, StackSettings
from cxr.stack.status import stack_status
from cxr.stack.supervisor import down, model_summary, up

__all__ = [
    "SERVICES", "BadSettingError", "ModelDirError", "PortInUseError", "ServiceStartError", "StackError",
    "StackSettings", "down", "model_summary", "stack_status", "up",
]  # fmt: skip
