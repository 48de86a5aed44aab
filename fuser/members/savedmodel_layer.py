"""A Keras layer that calls a SavedModel signature with named inputs.

Keras' ``TFSMLayer`` passes its input positionally, which a signature with several
named inputs does not accept; this subclass passes a dict as keyword arguments. It is
only ever used inside a build: a ``.keras`` artifact cannot hold it (it would store a
path to the member), which the exporter refuses up front.
"""

from __future__ import annotations

from keras.layers import TFSMLayer


class SavedModelBranch(TFSMLayer):
    def call(self, inputs, training=False):
        return self.call_endpoint_fn(**inputs)
