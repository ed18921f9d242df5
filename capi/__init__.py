"""capi: a server-side sender for the OpenAI Ads Conversions API.

Backend services enqueue events (:class:`~capi.producer.Producer`, or
:class:`~capi.producer.SyncProducer`); workers send them in batches with a Conversion Key,
retry what may succeed later, and dead-letter the rest with guidance an operator can act on.
"""

from capi.errors import CapiError, EventRejected, SendError
from capi.events import PreparedEvent, prepare, purchase, signup
from capi.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "CapiError",
    "EventRejected",
    "PreparedEvent",
    "SendError",
    "Settings",
    "__version__",
    "prepare",
    "purchase",
    "signup",
]
