#!/usr/bin/env python3
# Writes the seed corpora of fuzz/corpus/<target>/ (run from fuzz/): small real inputs taken
# from the tests and docs/PROTOCOL.md (RFC 6455 examples for the websocket targets).
import struct, os, base64
C = "corpus"
def w(t, name, data):
    os.makedirs(f"{C}/{t}", exist_ok=True)
    if isinstance(data, str): data = data.encode()
    open(f"{C}/{t}/{name}", "wb").write(data)
def meta(*e):
    return b"".join(struct.pack(">BH", t, len(v)) + v for t, v in e)
def frame(kind, flags, hops, part, rid, m, p):
    return struct.pack(">BBBBIQII", 0xFB, kind, flags, hops, part, rid, len(m), len(p)) + m + p
m = meta((1, b"demo/echo"), (2, b"main"), (3, b"api"), (4, b"sys"), (5, b"echo"), (6, b"42"), (7, b"POST"))
w("frame_decode", "request", frame(1, 0, 0, 10, 7, m, b"hello"))
w("frame_decode", "response", frame(2, 0, 0, 10, 7, meta((16, b"200"), (17, b"x-a: b")), b"hello"))
w("frame_decode", "redirect", frame(3, 0, 1, 3, 9, meta((2, b"auth"), (18, b"3")), b""))
w("frame_decode", "secret_push", frame(4, 0, 0, 0, 0, meta((1, b"demo/echo"), (19, b"2")), b"\x01" * 32))
def mask(p, k): return bytes(b ^ k[i % 4] for i, b in enumerate(p))
K = bytes([0x37, 0xfa, 0x21, 0x3d])
hello_masked = bytes([0x81, 0x85]) + K + mask(b"Hello", K)   # RFC 6455 5.7
w("ws_head", "text_masked", hello_masked)
w("ws_head", "binary_126", bytes([0x82, 0xFE, 0x01, 0x00]) + K)
w("ws_head", "binary_127", bytes([0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0]))
w("ws_head", "ping", bytes([0x89, 0x05]) + b"Hello")
w("ws_head", "close_payload", struct.pack(">H", 1000) + b"bye")
frag = bytes([0x01, 0x83]) + K + mask(b"Hel", K) + bytes([0x80, 0x82]) + K + mask(b"lo", K)
ping = bytes([0x89, 0x85]) + K + mask(b"Hello", K)
close = bytes([0x88, 0x82]) + K + mask(struct.pack(">H", 1000), K)
binm = bytes([0x82, 0xFE, 0x01, 0x00]) + K + mask(bytes(range(256)), K)
w("ws_reader", "server_messages", b"\x00" + hello_masked + frag + ping + binm + close)
w("ws_reader", "server_trickle", b"\x04" + hello_masked + close)
w("ws_reader", "client_messages", b"\x01" + bytes([0x81, 0x05]) + b"Hello" + bytes([0x8A, 0x00, 0x88, 0x00]))
w("ws_reader", "bad_close", b"\x00" + bytes([0x88, 0x81]) + K + mask(b"\x03", K))
up = ("GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\nSec-WebSocket-Version: 13\r\n"
      "Authorization: Bearer tok\r\n\r\n")
w("upgrade", "rfc_request", up)
w("upgrade", "version_8", up.replace("Version: 13", "Version: 8"))
w("upgrade", "response_101", "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
  "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
w("upgrade", "response_401", 'HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}')
p = "/api/ru/spb1/demo/echo/api/42/sys/echo"
w("http_parse_one", "get", f"GET {p} HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer t\r\n\r\n")
w("http_parse_one", "post_pipelined", f"POST {p} HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
  f"GET {p} HTTP/1.0\r\n\r\n")
w("http_parse_one", "chunked", f"PUT {p} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
w("http_parse_one", "expect", f"POST {p} HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
w("http_parse_one", "preflight", f"OPTIONS {p} HTTP/1.1\r\nHost: h\r\nOrigin: https://a.example\r\nAccess-Control-Request-Method: POST\r\n\r\n")
w("api_path", "echo", p)
w("api_path", "query", "/api/local/dev/demo/echo/auth/18446744073709551615/m.v1/f_-~?access_token=x")
w("api_path", "bad_wsid", "/api/a/b/c/d/e/+7/g/h")
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
claims = b'{"sub":"alice","app":"acme/shop","iat":1700000000,"exp":18446744073709551615}'
w("tokens", "jwt_string", b"\x00" + (b64(b'{"alg":"HS256","typ":"JWT","kid":"2"}') + "." + b64(claims) + ".c2ln").encode())
w("tokens", "jwt_claims", b"\x01" + claims)
w("tokens", "jwt_claims_nbf", b"\x01" + b'{"sub":"a","app":"acme/shop","iat":0,"exp":4000000000,"nbf":18446744073709551615}')
w("tokens", "service_claims", b"\x02" + b'{"kid":1,"sub":"task-1","app":"acme/shop","cluster":"local/dev","iat":0,"exp":18446744073709551615,"role":"auth"}')
w("tokens", "peer_claims", b"\x02" + b'{"kid":1,"sub":"r1","app":"","cluster":"ru/spb2","iat":0,"exp":4000000000}')
w("hello", "hello", '{"type":"hello","router":"local/dev/r0","cluster":"local/dev","shard":0,"shards":2,"internal":["127.0.0.1:40111","127.0.0.1:40112"]}')
w("hello", "register", '{"type":"register","task":123456789,"app":"demo/echo","role":"main","partitions":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]}')
w("hello", "registered", '{"type":"registered","shard":0}')
