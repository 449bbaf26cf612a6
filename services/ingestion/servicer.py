"""The gRPC servicer of cxr.ingestion.v1.IngestionService: transport only. Errors are raised, never aborted
here; ``services.ingestion.errors.ErrorInterceptor`` turns them into statuses."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from cxr.ingestion.v1 import ingestion_pb2 as pb
from cxr.ingestion.v1 import ingestion_pb2_grpc as pb_grpc
from services.ingestion.explanation_view import ExplanationView
from services.ingestion.pipeline import AnalyzePipeline, ConcurrencyLimit
from services.ingestion.upload_stream import IdleLimitedStream


class IngestionServicer(pb_grpc.IngestionServiceServicer):
    """Delegates Analyze to the pipeline (its upload cut after ``upload_idle_s`` seconds of silence) and the
    explanation RPCs to the view."""

    def __init__(
        self, pipeline: AnalyzePipeline, view: ExplanationView, *, max_watches: int, upload_idle_s: float
    ) -> None:
        self._pipeline = pipeline
        self._view = view
        self._upload_idle_s = upload_idle_s
        self._watches = ConcurrencyLimit(max_watches, "WatchExplanation streams")

    def Analyze(
        self, request_iterator: Iterator[pb.AnalyzeRequest], context: grpc.ServicerContext
    ) -> pb.AnalyzeResponse:
        with IdleLimitedStream(request_iterator, self._upload_idle_s) as requests:
            return self._pipeline.analyze(requests, time_remaining=context.time_remaining())

    def GetExplanation(self, request: pb.GetExplanationRequest, context: grpc.ServicerContext) -> pb.Explanation:
        return self._view.get(request)

    def WatchExplanation(
        self, request: pb.WatchExplanationRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExplanationProgress]:
        with self._watches.hold():
            yield from self._view.watch(
                request.job_id, time_remaining=context.time_remaining, is_active=context.is_active
            )
