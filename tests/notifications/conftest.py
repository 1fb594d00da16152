"""Fixtures of the notification tests: a NotificationService stub on the session's server."""

from __future__ import annotations

import grpc
import pytest

from prefd.v1 import notifications_pb2_grpc


@pytest.fixture
def notify(channel: grpc.aio.Channel) -> notifications_pb2_grpc.NotificationServiceStub:
    return notifications_pb2_grpc.NotificationServiceStub(channel)
