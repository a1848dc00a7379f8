"""A small converter: fitted scikit-learn classifiers to TFLite flatbuffers.

The TFLite example models are built here, in an optional build step, from the same
fitted estimators the ONNX examples come from, so the same pipeline spec can run on
both backends and give the same answers. It writes the flatbuffer with the schema
module that ships inside `ai-edge-litert` (the `tflite` extra); no TensorFlow needed.

Supported: `MLPClassifier` (ReLU hidden layers) and multinomial `LogisticRegression`,
each becoming FULLY_CONNECTED layers and a SOFTMAX, with input `input` [N, features]
(and optionally `gain` [N, 1], a MUL in front) and output `probabilities` [N, classes]
(optionally uint8, quantized).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["sklearn_to_tflite"]

Array = npt.NDArray[Any]


def _layers(estimator: Any) -> list[tuple[Array, Array, bool]]:
    """(weights [in, out], bias [out], relu?) per dense layer."""
    if hasattr(estimator, "coefs_"):
        if getattr(estimator, "activation", "relu") != "relu":
            raise ValueError("only ReLU MLPs are supported")
        coefs, biases = estimator.coefs_, estimator.intercepts_
        return [
            (w, b, i < len(coefs) - 1) for i, (w, b) in enumerate(zip(coefs, biases, strict=True))
        ]
    if hasattr(estimator, "coef_"):
        coef = np.asarray(estimator.coef_)
        if coef.shape[0] < 3:
            raise ValueError("only multinomial (3+ class) logistic regression is supported")
        return [(coef.T, np.asarray(estimator.intercept_), False)]
    raise ValueError(f"cannot convert {type(estimator).__name__}")


def sklearn_to_tflite(
    estimator: Any, gain_input: bool = False, quantized_output: bool = False
) -> bytes:
    """Convert a fitted classifier to TFLite bytes.

    Args:
        estimator: the fitted classifier.
        gain_input: add a second input, `gain` [N, 1], that multiplies the features
            before the first layer (a model with two inputs; a gain of 1 answers as the
            estimator does).
        quantized_output: give the probabilities as uint8 with a scale of 1/256 (a
            QUANTIZE after the SOFTMAX), as quantized TFLite classifiers do.

    Raises:
        ImportError: the `tflite` extra (ai-edge-litert) is not installed.
        ValueError: an estimator or activation this converter does not handle.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    layers = _layers(estimator)
    buffers = [fb.BufferT()]  # buffer 0 is the conventional empty buffer
    tensors: list[Any] = []

    def tensor(name: str, shape: list[int], data: Array | None = None) -> int:
        t = fb.TensorT()
        t.name = name
        t.shape = np.array([1 if d < 0 else d for d in shape], dtype=np.int32)
        t.shapeSignature = np.array(shape, dtype=np.int32)
        t.type = fb.TensorType.FLOAT32
        if data is None:
            t.buffer = 0
        else:
            buf = fb.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data, np.float32).tobytes(), np.uint8)
            buffers.append(buf)
            t.buffer = len(buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    codes = []
    builtins = (
        fb.BuiltinOperator.FULLY_CONNECTED,
        fb.BuiltinOperator.SOFTMAX,
        fb.BuiltinOperator.MUL,
        fb.BuiltinOperator.QUANTIZE,
    )
    for builtin in builtins:
        code = fb.OperatorCodeT()
        code.builtinCode = builtin
        code.deprecatedBuiltinCode = builtin
        code.version = 1
        codes.append(code)

    n_in = int(layers[0][0].shape[0])
    current = tensor("input", [-1, n_in])
    graph_inputs = [current]
    ops = []
    if gain_input:
        gain = tensor("gain", [-1, 1])
        graph_inputs.append(gain)
        scaled = tensor("scaled", [-1, n_in])
        mul = fb.OperatorT()
        mul.opcodeIndex = 2
        mul.inputs = np.array([current, gain], dtype=np.int32)
        mul.outputs = np.array([scaled], dtype=np.int32)
        mul.builtinOptionsType = fb.BuiltinOptions.MulOptions
        mul.builtinOptions = fb.MulOptionsT()
        ops.append(mul)
        current = scaled
    for i, (w, b, relu) in enumerate(layers):
        w_t = tensor(f"dense{i}/weights", list(w.T.shape), w.T)
        b_t = tensor(f"dense{i}/bias", [int(b.shape[0])], b)
        out = tensor(f"dense{i}/out", [-1, int(w.shape[1])])
        op = fb.OperatorT()
        op.opcodeIndex = 0
        op.inputs = np.array([current, w_t, b_t], dtype=np.int32)
        op.outputs = np.array([out], dtype=np.int32)
        op.builtinOptionsType = fb.BuiltinOptions.FullyConnectedOptions
        opts = fb.FullyConnectedOptionsT()
        opts.fusedActivationFunction = (
            fb.ActivationFunctionType.RELU if relu else fb.ActivationFunctionType.NONE
        )
        op.builtinOptions = opts
        ops.append(op)
        current = out
    classes = int(layers[-1][0].shape[1])
    probs = tensor("probabilities_float" if quantized_output else "probabilities", [-1, classes])
    soft = fb.OperatorT()
    soft.opcodeIndex = 1
    soft.inputs = np.array([current], dtype=np.int32)
    soft.outputs = np.array([probs], dtype=np.int32)
    soft.builtinOptionsType = fb.BuiltinOptions.SoftmaxOptions
    soft_opts = fb.SoftmaxOptionsT()
    soft_opts.beta = 1.0
    soft.builtinOptions = soft_opts
    ops.append(soft)
    if quantized_output:
        out = tensor("probabilities", [-1, classes])
        q = fb.QuantizationParametersT()
        q.scale = np.array([1.0 / 256.0], dtype=np.float32)
        q.zeroPoint = np.array([0], dtype=np.int64)
        tensors[out].type = fb.TensorType.UINT8
        tensors[out].quantization = q
        quant = fb.OperatorT()
        quant.opcodeIndex = 3
        quant.inputs = np.array([probs], dtype=np.int32)
        quant.outputs = np.array([out], dtype=np.int32)
        ops.append(quant)
        probs = out

    graph = fb.SubGraphT()
    graph.tensors = tensors
    graph.inputs = np.array(graph_inputs, dtype=np.int32)
    graph.outputs = np.array([probs], dtype=np.int32)
    graph.operators = ops
    graph.name = "main"
    model = fb.ModelT()
    model.version = 3
    model.operatorCodes = codes
    model.subgraphs = [graph]
    model.buffers = buffers
    model.description = f"edgewise converter: {type(estimator).__name__}"
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
