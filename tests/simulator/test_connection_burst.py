"""The simulator takes a burst of new connections at once, as a starting worker fleet opens them."""

from __future__ import annotations

import select
import socket

from nova_email.simulator.server import SimulatorServer
from nova_email.simulator.state import Simulator

#: Connections opened together: two processes of 8 threads each, and their proxies, with room to spare.
BURST = 40


def test_a_burst_of_connections_is_queued_by_the_kernel_not_dropped() -> None:
    # Given a simulator whose listening socket accepts nothing yet (its threads busy, or just started)
    server = SimulatorServer(("127.0.0.1", 0), Simulator(grants=["grant-a"], threads_per_grant=1))
    try:
        # When a burst of clients connects at once
        clients = [socket.socket() for _ in range(BURST)]
        for client in clients:
            client.setblocking(False)
            client.connect_ex(server.server_address)

        # Then every connection completes at once: a dropped one would wait a second for its TCP retry
        pending = list(clients)
        while pending:
            _, writable, _ = select.select([], pending, [], 0.5)
            if not writable:
                break
            pending = [client for client in pending if client not in writable]
        assert len(pending) == 0, f"{len(pending)} of {BURST} connections dropped"
    finally:
        for client in clients:
            client.close()
        server.server_close()
