"""Artifact formats and writing them.

``registry`` lists the formats (``onnx``, ``savedmodel``, ``keras``: one module each, a
``format.Format`` in each) and says which one an output path asks for; ``writer`` is the
one way every artifact is written (``output`` checks where one goes, ``write`` writes it);
``placement`` how it lands, atomically (the model repositories use it too).
"""
