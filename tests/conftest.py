import ipaddress
import os
import socket
import sys

import pytest

# Tests import the top-level modules (model.py, vision.py, ...) the way the scripts do.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# No test reaches the network. The hub client reads this when it is first imported, here and in every script a test
# starts (they inherit the environment), so a hub id is looked up in the local cache only.
os.environ["HF_HUB_OFFLINE"] = "1"

# In this process, a connection or name lookup for anything but this machine is refused, and the test that asked
# fails even where the code under test catches the refusal (as a fetch that falls back would).
refused = []


def loopback(host):
    host = host.decode() if isinstance(host, bytes) else host
    if host in (None, "", "localhost"):  # None and "": this machine's own addresses, as a server binds them
        return True
    try:
        ip = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:  # a name: resolving it is already a network request
        return False
    return ip.is_loopback or ip.is_unspecified


def refuse(address):
    refused.append(repr(address))
    raise OSError(f"tests/conftest.py: no network in the tests, refused {address!r}")


def guarded_connect(original):
    def connect(sock, address):
        if isinstance(address, tuple) and not loopback(address[0]):  # AF_UNIX addresses are paths
            refuse(address)
        return original(sock, address)
    return connect


def guarded_getaddrinfo(host, *args, **kwargs):
    if not loopback(host):
        refuse(host)
    return getaddrinfo(host, *args, **kwargs)


socket.socket.connect = guarded_connect(socket.socket.connect)
socket.socket.connect_ex = guarded_connect(socket.socket.connect_ex)
getaddrinfo, socket.getaddrinfo = socket.getaddrinfo, guarded_getaddrinfo  # create_connection resolves through it


@pytest.fixture(autouse=True)
def no_network():
    refused.clear()
    yield
    assert not refused, f"the test tried to reach the network: {', '.join(refused)}"
