"""What every Python user of the task API shares about its messages, written once.

The generated code (``charai.tasks.v1``, ``charai.store.v1``) says what the messages are; this
package says how charai reads them, for the gateway, task_store, the workers, the Python client
and its CLI alike:

* :mod:`charai.taskapi.states`: which statuses and events end a task;
* :mod:`charai.taskapi.labels`: the short names of enum values (``queued``, ``image_generation``,
  ``PROVIDER_AUTH``) used in JSON, metrics, logs and command lines, and their parse tables;
* :mod:`charai.taskapi.errors`: the ``google.rpc`` details of a failed call (bad fields, the
  ErrorInfo reason, RetryInfo's delay).

It is hand-written and lives beside the generated packages in the ``charai-protos``
distribution, which is all the Python client depends on (``make proto`` leaves it alone).
"""

from charai.taskapi.errors import ErrorDetails, error_details, status_details
from charai.taskapi.labels import (
    PRIORITIES,
    STATUSES,
    TASK_TYPES,
    error_code_label,
    error_code_name,
    event_type_label,
    priority_label,
    status_label,
    type_label,
)
from charai.taskapi.states import TERMINAL_EVENTS, TERMINAL_STATUSES, is_final

__all__ = [
    "PRIORITIES",
    "STATUSES",
    "TASK_TYPES",
    "TERMINAL_EVENTS",
    "TERMINAL_STATUSES",
    "ErrorDetails",
    "error_code_label",
    "error_code_name",
    "error_details",
    "event_type_label",
    "is_final",
    "priority_label",
    "status_details",
    "status_label",
    "type_label",
]
