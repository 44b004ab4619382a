"""Megatron-LM's own code writing and reading torch_dist GPT checkpoints, on one CPU process (test helper).

Run with PYTHONPATH=$MEGATRON_LM_DIR (a Megatron-LM checkout at core_v0.16.1, whose megatron/core is the
release installed here):

    python tests/megatron_lm_side.py write OUT BPE_DIR   # pretrain_gpt.py's args, model, generate_state_dict
    python tests/megatron_lm_side.py read CKPT_DIR OUT   # load_args_from_checkpoint + load_checkpoint

Both write OUT/logits.pt: the model's logits on tokens (arange(32) % 200) after the save / load.
`megatron.training`'s package __init__ (which pulls in triton through initialize.py) is bypassed: its
modules are imported one by one.  megatron_dataeff's platform support makes megatron-core run on a CPU.
"""

import importlib
import os
import sys
import types

COMMON = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
          "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32", "--max-position-embeddings", "32",
          "--micro-batch-size", "2", "--global-batch-size", "4", "--normalization", "RMSNorm", "--swiglu",
          "--disable-bias-linear", "--position-embedding-type", "rope", "--no-position-embedding",
          "--ckpt-format", "torch_dist", "--transformer-impl", "local", "--train-iters", "10", "--lr", "1e-3",
          "--save-interval", "10", "--use-cpu-initialization", "--no-rope-fusion",
          "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
          "--no-bias-dropout-fusion", "--no-persist-layer-norm"]


def _megatron_training():
    root = os.environ["MEGATRON_LM_DIR"]
    pkg = types.ModuleType("megatron.training")
    pkg.__path__ = [os.path.join(root, "megatron", "training")]
    sys.modules["megatron.training"] = pkg
    import megatron

    megatron.training = pkg
    global_vars = importlib.import_module("megatron.training.global_vars")
    pkg.__dict__.update({k: getattr(global_vars, k) for k in dir(global_vars) if not k.startswith("_")})
    return (global_vars, importlib.import_module("megatron.training.arguments"),
            importlib.import_module("megatron.training.checkpointing"))


def _setup(argv):
    import torch

    from megatron_dataeff.platform import enable_cpu_support

    global_vars, arguments, checkpointing = _megatron_training()
    enable_cpu_support()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    sys.argv = ["pretrain_gpt.py", *argv]
    args = arguments.parse_args()
    return global_vars, arguments, checkpointing, args


def _model(arguments, args):
    """The model pretrain_gpt.py builds with --transformer-impl local."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = arguments.core_transformer_config_from_args(args)
    spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm, normalization=args.normalization)
    return GPTModel(config, spec, vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                    pre_process=True, post_process=True,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                    rotary_base=args.rotary_base)


def _save_logits(model, out):
    import torch

    model.eval()
    tokens = torch.arange(32)[None] % 200
    with torch.no_grad():
        torch.save(model(tokens, torch.arange(32)[None], None), os.path.join(out, "logits.pt"))


def write(out, bpe_dir):
    import torch
    from megatron.core import dist_checkpointing

    global_vars, arguments, checkpointing, args = _setup(
        COMMON + ["--untie-embeddings-and-output-weights", "--tokenizer-type", "GPT2BPETokenizer",
                  "--vocab-file", f"{bpe_dir}/vocab.json", "--merge-file", f"{bpe_dir}/merges.txt", "--save", out])
    args.padded_vocab_size = 512  # what Megatron-LM pads this 400-token vocabulary to (multiple of 128)
    arguments.validate_args(args)
    global_vars.set_args(args)
    torch.manual_seed(0)
    model = _model(arguments, args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norms away from 1
    state = checkpointing.generate_state_dict(args, [model], None, None, None, iteration=10)
    path = checkpointing.get_checkpoint_name(out, 10, return_base_dir=True)
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(state, path)
    with open(checkpointing.get_checkpoint_tracker_filename(out), "w") as f:
        f.write("10")
    _save_logits(model, out)


def read(ckpt, out):
    global_vars, arguments, checkpointing, args = _setup(
        ["--load", ckpt, "--use-checkpoint-args", "--ckpt-format", "torch_dist", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-3", "--use-cpu-initialization",
         "--no-rope-fusion", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
         "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-persist-layer-norm",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "1"])
    args, _ = checkpointing.load_args_from_checkpoint(args)
    arguments.validate_args(args)
    global_vars.set_args(args)
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

    init_num_microbatches_calculator(0, None, args.global_batch_size, args.micro_batch_size, args.data_parallel_size)
    model = _model(arguments, args)
    iteration, _ = checkpointing.load_checkpoint([model], None, None, strict=True)
    print(f"megatron-lm loaded iteration {iteration}: {args.num_layers} layers, hidden {args.hidden_size}, "
          f"{args.normalization}, padded vocab {args.padded_vocab_size}", flush=True)
    _save_logits(model, out)


if __name__ == "__main__":
    {"write": write, "read": read}[sys.argv[1]](*sys.argv[2:])
