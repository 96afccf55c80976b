"""Calls one unary gRPC method with Python's grpcio (gRPC core), the way non-Go CSI clients
do: the target is a unix:// or host:port address and grpcio picks the :authority itself
(for unix sockets, the percent-encoded socket path). No generated code: the request is raw
protobuf bytes given in hex, the response is printed in hex.

Usage: python grpc-unary.py TARGET /package.Service/Method [REQUEST_HEX]
Exit 0 with the response hex on stdout, or 1 with "CODE: details" on stderr.
"""
import sys

import grpc


def main() -> int:
    target, method = sys.argv[1], sys.argv[2]
    request = bytes.fromhex(sys.argv[3]) if len(sys.argv) > 3 else b""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            response = call(request, timeout=20, wait_for_ready=True)
        except grpc.RpcError as e:
            print(f"{e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(response.hex())
    return 0


if __name__ == "__main__":
    sys.exit(main())
