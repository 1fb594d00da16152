"""prefd.client: a thin, typed layer over the generated stubs.

async with AsyncPrefdClient("localhost:50051", token=os.environ["PREFD_TOKEN"]) as client:
    reply = await client.get_effective("alice", org_id="acme", categories=["display"])
"""

from prefd.client.channel import SERVICE_CONFIG, AsyncPrefdClient, channel_options
from prefd.client.errors import PrefdError, ValidationError, from_rpc_error

__all__ = ["SERVICE_CONFIG", "AsyncPrefdClient", "PrefdError", "ValidationError", "channel_options", "from_rpc_error"]
