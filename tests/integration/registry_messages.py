"""Two versions of one Protobuf message, as generated code would give them (without protoc here).

`ChatMessageV1` (id, text, author) and `ChatMessage`, the same message after a field was added
(guild): what a producer used before and after an upgrade. Each lives in its own descriptor pool,
as two builds of the same .proto would.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


def _message_class(fields: list[str]) -> type:
    proto = descriptor_pb2.FileDescriptorProto(name="chat.proto", package="chat", syntax="proto3")
    message = proto.message_type.add(name="ChatMessage")
    for number, name in enumerate(fields, 1):
        message.field.add(name=name, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                          label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("chat.ChatMessage"))


ChatMessageV1 = _message_class(["id", "text", "author"])
ChatMessage = _message_class(["id", "text", "author", "guild"])
