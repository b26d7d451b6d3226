"""One interceptor maps every handler exception to a gRPC status (see errors.grpc_status).

Only fatal errors (FatalError, device OOM) stop the server; the launcher then tears the set down.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from loguru import logger

from .errors import grpc_status


class ExceptionInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, on_fatal: Callable[[], None]):
        self.on_fatal = on_fatal

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method.rsplit("/", 1)[-1]

        async def guarded(request, context):
            try:
                return await inner(request, context)
            except Exception as err:
                code, fatal = grpc_status(err)
                if fatal:
                    logger.exception(f"{method}: fatal error, shutting down: {err}")
                    self.on_fatal()
                elif code == grpc.StatusCode.INTERNAL:
                    logger.exception(f"{method} failed: {err}")
                else:
                    logger.warning(f"{method} rejected ({code.name}): {err}")
                await context.abort(code, f"{type(err).__name__}: {err}" if code == grpc.StatusCode.INTERNAL else str(err))

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
