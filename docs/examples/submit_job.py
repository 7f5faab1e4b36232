"""Submit one image job with the generated stubs and print its id and status.

Run it against a handler (``make run`` starts one on 127.0.0.1:50051):

    .venv/bin/python docs/examples/submit_job.py 127.0.0.1:50051
"""

import sys

import grpc

from imagehandler.v1 import common_pb2, job_service_pb2, job_service_pb2_grpc

handler = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
with grpc.insecure_channel(handler) as channel:
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    reply = jobs.SubmitJob(
        job_service_pb2.SubmitJobRequest(
            object=common_pb2.ScanObject(
                image=common_pb2.ImageObject(repository="library/alpine", tag="3.20")
            )
        )
    )
    print(reply.job.id, common_pb2.JobStatus.Name(reply.job.status))
