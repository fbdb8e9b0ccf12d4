"""The client's side of the transport: credentials and deadlines on every call, and what a failed connection means.

:class:`Credentials` is a client interceptor: it puts the token into a Join's metadata, the session into every other
call's (the server's gate checks them before it reads a request, :mod:`hetfl.deploy.gate`), the client process's
random instance id into all of them (so its own rejoin may replace its session), and a deadline on any call made
without one.

:func:`tls_problem` tells a TLS mistake from a server that is merely down, so that the client fails in seconds with
one line saying what to change instead of retrying for ``--give-up-after``. gRPC reports a certificate that does not
verify as a failed handshake, but a plaintext client talking to a TLS server, and a mutual-TLS server refusing a
client's (missing or unknown) certificate, only as a closed socket, which a restarting server also causes; there a
short probe with Python's TLS library tells them apart: a TLS handshake that succeeds where gRPC spoke plaintext
means the server wants TLS; a server that closes the connection right after the handshake refuses the client's
certificate.
"""

from __future__ import annotations

import collections
import socket
import ssl
from typing import Any

import grpc

from hetfl.deploy.gate import INSTANCE_KEY, SESSION_KEY, TOKEN_KEY

DEFAULT_CALL_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 3.0


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class Credentials(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """The token (Join) or the session (every other call), the instance id, and a deadline, on every call.

    ``client`` has ``token``, ``session`` (None before the first join) and ``instance``, read at each call."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        c = self.client
        metadata = list(details.metadata or ())
        if details.method.endswith("/Join"):
            metadata.append((TOKEN_KEY, c.token.encode()))
        elif c.session is not None:
            metadata.append((SESSION_KEY, c.session))
        metadata.append((INSTANCE_KEY, c.instance))
        timeout = details.timeout if details.timeout is not None else DEFAULT_CALL_TIMEOUT_S
        return _CallDetails(details.method, timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(address: str, ca: bytes | None = None, key: bytes | None = None, cert: bytes | None = None) -> grpc.Channel:
    """A channel to a hetfl server (or aggregator) at ``address``: TLS when ``ca`` is given (mutual with ``key`` and
    ``cert``), messages up to 64 MiB (chunks are smaller), keepalive pings so a vanished server is noticed."""
    size = 64 << 20
    opts = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
            # a server that vanished without closing the connection is noticed within a minute
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 20_000)]
    if ca is None:
        return grpc.insecure_channel(address, options=opts)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(address, creds, options=opts)


def tls_problem(detail: str, server: str, ca: bytes | None, cert_file: str | None = None,
                key_file: str | None = None) -> str | None:
    """What is wrong with TLS between this client and ``server``, given gRPC's ``detail`` of an UNAVAILABLE call
    (one line, what to change); None when it is no TLS problem (a server that is down or restarting)."""
    lowered = detail.lower()
    handshake = "handshake failed" in lowered or "ssl_error" in lowered or "certificate" in lowered
    if not handshake and "socket closed" not in lowered and "connection reset" not in lowered:
        return None
    if "wrong_version_number" in lowered:
        return (f"the server at {server} does not speak TLS, and this client does (--tls-ca): drop --tls-ca, or "
                "start the server with --tls-cert/--tls-key")
    found = _probe(server, ca, cert_file, key_file)
    if found is None and handshake:
        reason = detail.rsplit("OPENSSL_internal:", 1)[-1].split(": OK")[0] if "OPENSSL_internal:" in detail else detail
        found = f"the TLS handshake with the server at {server} failed ({reason.strip()})"
    if found is None:
        return None
    if ca is not None and "certificate" not in found and "does not speak TLS" not in found:
        found += "; check --tls-ca (the authority that signed the server's certificate)"
    return found


def _probe(server: str, ca: bytes | None, cert_file: str | None, key_file: str | None) -> str | None:
    host, _, port = server.rpartition(":")
    host = host.strip("[]")
    try:
        sock = socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S)
    except (OSError, ValueError):
        return None  # not reachable now: not a TLS problem
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["h2"])
    try:
        if ca is None:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        else:
            ctx.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
            if cert_file is not None and key_file is not None:
                ctx.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError, ValueError):
        sock.close()
        return None  # the files were checked when the client started; nothing clearer to say here
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            if ca is None:
                return (f"the server at {server} speaks TLS and this client does not: give --tls-ca CA.pem (the "
                        "authority that signed the server's certificate)")
            tls.settimeout(PROBE_TIMEOUT_S)
            try:
                first = tls.recv(1)  # a gRPC server speaks first (HTTP/2 settings); one refusing our certificate hangs up
            except (TimeoutError, socket.timeout):
                return None
            except (ssl.SSLError, OSError):
                first = b""
            if first:
                return None
            if cert_file is None:
                return (f"the server at {server} requires a client certificate (mutual TLS): give --tls-cert and "
                        "--tls-key, signed by the authority the server trusts (its --tls-client-ca)")
            return (f"the server at {server} does not accept this client's certificate (--tls-cert): it must be "
                    "signed by the authority the server trusts (its --tls-client-ca)")
    except ssl.SSLCertVerificationError as err:
        return (f"the server at {server} presented a certificate that does not verify with --tls-ca "
                f"({err.verify_message}): give the authority that signed it, and a --server host its certificate names")
    except ssl.SSLError as err:
        if "WRONG_VERSION_NUMBER" in str(err):
            if ca is None:
                return None  # a plaintext server, as this client expects: not a TLS problem
            return (f"the server at {server} does not speak TLS, and this client does (--tls-ca): drop --tls-ca, "
                    "or start the server with --tls-cert/--tls-key")
        if ca is None and "ALERT" in str(err).upper():
            return (f"the server at {server} speaks TLS and this client does not: give --tls-ca CA.pem (the "
                    "authority that signed the server's certificate)")
        return None
    except OSError:
        return None
