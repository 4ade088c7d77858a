"""ImageService: translates CRI image requests into ImageManager calls."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

from cripy.api import api_pb2 as pb
from cripy.api import api_pb2_grpc
from cripy.image.registry import Credentials
from cripy.image.service import ImageManager
from cripy.image.store import ImageRecord
from cripy.server.rpc import Context, rpc

ContainerUsage = Callable[[], Awaitable[list[pb.FilesystemUsage]]]


class ImageServicer(api_pb2_grpc.ImageServiceServicer):
    def __init__(self, images: ImageManager,
                 container_usage: ContainerUsage | None = None) -> None:
        self.images = images
        self.container_usage = container_usage  # the containers' writable layers

    @rpc
    async def PullImage(
        self, request: pb.PullImageRequest, context: Context
    ) -> pb.PullImageResponse:
        auth = request.auth
        creds = Credentials(
            username=auth.username,
            password=auth.password,
            auth=auth.auth,
            identity_token=auth.identity_token,
            registry_token=auth.registry_token,
        )
        self.images.check_runtime_handler(request.image.runtime_handler)
        record = await self.images.pull(request.image.image, creds)
        return pb.PullImageResponse(image_ref=record.id)

    @rpc
    async def ListImages(
        self, request: pb.ListImagesRequest, context: Context
    ) -> pb.ListImagesResponse:
        self.images.check_runtime_handler(request.filter.image.runtime_handler)
        records = self.images.list(request.filter.image.image)
        return pb.ListImagesResponse(images=[self._image(r) for r in records])

    @rpc
    async def ImageStatus(
        self, request: pb.ImageStatusRequest, context: Context
    ) -> pb.ImageStatusResponse:
        self.images.check_runtime_handler(request.image.runtime_handler)
        record = self.images.lookup(request.image.image)
        if record is None:  # the CRI answers an absent image with an empty response
            return pb.ImageStatusResponse()
        info = {}
        if request.verbose:
            info["info"] = json.dumps(
                {
                    "id": record.id,
                    "manifestDigest": record.manifest_digest,
                    "layers": record.layers,
                    "imageSpec": self.images.image_config(record),
                }
            )
        return pb.ImageStatusResponse(image=self._image(record), info=info)

    @rpc
    async def RemoveImage(
        self, request: pb.RemoveImageRequest, context: Context
    ) -> pb.RemoveImageResponse:
        self.images.check_runtime_handler(request.image.runtime_handler)
        await self.images.remove(request.image.image)
        return pb.RemoveImageResponse()

    @rpc
    async def ImageFsInfo(
        self, request: pb.ImageFsInfoRequest, context: Context
    ) -> pb.ImageFsInfoResponse:
        used_bytes, inodes = await self.images.usage()
        usage = pb.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=pb.FilesystemIdentifier(mountpoint=str(self.images.mountpoint)),
            used_bytes=pb.UInt64Value(value=used_bytes),
            inodes_used=pb.UInt64Value(value=inodes),
        )
        containers = await self.container_usage() if self.container_usage else []
        return pb.ImageFsInfoResponse(image_filesystems=[usage],
                                      container_filesystems=containers)

    def _image(self, record: ImageRecord) -> pb.Image:
        user = self.images.image_user(record)
        return pb.Image(
            id=record.id,
            repo_tags=record.repo_tags,
            repo_digests=record.repo_digests,
            size=record.size,
            uid=pb.Int64Value(value=user.uid) if user.uid is not None else None,
            username=user.username,
            spec=pb.ImageSpec(image=record.id),
            pinned=self.images.is_pinned(record),
        )
