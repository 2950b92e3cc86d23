"""CurveZMQ for stages on other hosts: ZeroMQ over TCP, encrypted and authenticated both ways.

No secret key ever travels. The coordinator makes its key pair and hands the daemon only its
public key; the daemon makes its own pair and hands back only its public key (both through the
cluster engine that starts it). On the daemon's socket a ZAP handler admits the coordinator's
public key and nothing else, so a peer without the keys never gets a message through: its
handshake fails and the daemon goes on serving.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator

from ..errors import IpcError

ZAP_DOMAIN = "shardrt"
_Z85_KEY = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes

    @classmethod
    def generate(cls) -> "KeyPair":
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def __repr__(self) -> str:  # never print a secret key
        return f"KeyPair(public={self.public.decode()})"


@dataclass(frozen=True)
class ClientKeys:
    """What the coordinator needs: its own pair and the daemon's public key."""

    own: KeyPair
    server_public: bytes


def public_key(value: object, field: str) -> bytes:
    """A Z85 public key as it arrives from another process, checked."""
    raw = value.encode() if isinstance(value, str) else value
    if not isinstance(raw, bytes) or not _Z85_KEY.fullmatch(raw):
        raise IpcError(f"{field}: is not a 40-character Z85 CurveZMQ key")
    return raw


class _OneClient:
    """ZAP credentials: the one public key this daemon admits."""

    def __init__(self, public: bytes):
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        return domain == ZAP_DOMAIN and key == self.public


class CurveServer:
    """Secures server sockets of one context with a key pair of its own and a ZAP thread that
    admits `client_public` only."""

    def __init__(self, context: zmq.Context, client_public: bytes):
        self.own = KeyPair.generate()
        self.authenticator = ThreadAuthenticator(context)
        self.authenticator.start()
        self.authenticator.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_OneClient(client_public))

    @property
    def public(self) -> bytes:
        """The key the coordinator needs to reach this server."""
        return self.own.public

    def secure(self, socket: zmq.Socket) -> zmq.Socket:
        """Make `socket` a Curve server; call before bind."""
        socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler answering: refuse, never admit
        socket.zap_domain = ZAP_DOMAIN.encode()
        socket.curve_secretkey = self.own.secret
        socket.curve_publickey = self.own.public
        socket.curve_server = True
        return socket

    def close(self) -> None:
        self.authenticator.stop()


def secure_client(socket: zmq.Socket, keys: ClientKeys) -> zmq.Socket:
    """Make `socket` a Curve client of the daemon whose public key `keys` holds; call before connect."""
    socket.curve_secretkey = keys.own.secret
    socket.curve_publickey = keys.own.public
    socket.curve_serverkey = keys.server_public
    return socket
