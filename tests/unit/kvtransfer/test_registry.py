import asyncio

import pytest
import torch

from kvtransfer import KvLayout, available_transports, make_puller
from kvtransfer.grpc_transport import GrpcPuller

LAYOUT = KvLayout("m", "float32", 4, 2, 1, 8)


def test_unknown_transport_lists_known_ones():
    with pytest.raises(ValueError) as error:
        make_puller("rdma-magic", torch.zeros(2, 2, 2, 4, 1, 8), LAYOUT)
    assert "grpc" in str(error.value) and "nixl" in str(error.value)


def test_grpc_is_always_available_and_last():
    transports = available_transports()
    assert transports[-1] == "grpc" and set(transports) <= {"nixl", "grpc"}


def test_make_puller_builds_the_named_transport():
    puller = make_puller("grpc", torch.zeros(2, 2, 2, 4, 1, 8), LAYOUT)
    assert isinstance(puller, GrpcPuller) and puller.name == "grpc"
    asyncio.run(puller.close())


def test_pool_not_matching_layout_is_refused():
    with pytest.raises(ValueError):
        make_puller("grpc", torch.zeros(2, 3, 2, 4, 1, 8), LAYOUT)
