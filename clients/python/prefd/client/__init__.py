"""prefd.client: typed calls and live views over the generated stubs.

    async with AsyncPrefdClient("localhost:50051", token=os.environ["PREFD_TOKEN"]) as client:
        view = await client.preferences("alice", org_id="acme")
        view.get("display.theme")          # from memory, no I/O
        view.on_change(lambda changes: ...)
        await client.set_preferences(request)  # one method per RPC, typed errors

`PrefdClient` is the same for threaded code (blocking calls, the same views).
"""

from prefd.client.channel import SERVICE_CONFIG, AsyncPrefdClient, TLSConfig, channel_options
from prefd.client.errors import PrefdError, ValidationError, from_rpc_error
from prefd.client.sync import PrefdClient
from prefd.client.views import AIConfigView, Backoff, KeyChange, PreferencesView, StaleViewError

__all__ = [
    "SERVICE_CONFIG",
    "AIConfigView",
    "AsyncPrefdClient",
    "Backoff",
    "KeyChange",
    "PrefdClient",
    "PrefdError",
    "PreferencesView",
    "StaleViewError",
    "TLSConfig",
    "ValidationError",
    "channel_options",
    "from_rpc_error",
]
