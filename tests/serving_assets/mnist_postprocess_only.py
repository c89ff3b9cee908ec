"""A user handler that extends another one by overriding postprocess only (BaseHandler's handle stays)."""

from mnist_handler import MnistHandler


class RenamedOutputs(MnistHandler):
    def postprocess(self, data):
        return [{"digit": row["class"], "confidence": row["probability"]} for row in super().postprocess(data)]

    def describe_handle(self):
        return {"description": "digits, postprocess only"}
