"""gRPC interop harness: grpc's own TestService, its server and its client cases, for calls through the mesh.

`protos/` holds grpc's interop protos, package `grpc.testing`, unchanged but for the import paths in test.proto.
Upstream grpc/grpc, read from the stored copies of these commits (the whole repository was too large to fetch):
`src/proto/grpc/testing/test.proto` at c74ea80416d57e6ebe556a651362123600701f57,
`messages.proto` at 019f03fde8ed6756786bf032dd70814ed919e1dc, `empty.proto` at 266cc59e5e1c8fd3a2759e367feba539e75afbc7.
The cases follow `doc/interop-test-descriptions.md` (the version with special_status_message).

`interop.py` compiles the protos at test time (`compile_protos`), serves TestService and grpc.health.v1
(`TestServiceServer`, in process or as `python -m tests.grpc.interop serve --port P`) and holds the client cases
(`CASES`), each taking a channel so that only the target address changes between a direct call and one through
the gateways.
"""
