"""CNN teacher -> ViT student (torchvision ResNet-18 -> kdzoo vit:nano) with OFA, a cross-architecture method.

    python examples/cnn_to_vit.py                                       # generated data, seconds on a CPU
    python examples/cnn_to_vit.py --teacher runs/examples/tv_teacher --data /path/to/images --epochs 100

A ViT learns slowly from few images: on real data give it many epochs.  The configs are
examples/configs/tv_teacher.yaml and cnn_to_vit.yaml ('kdzoo methods' lists the cross-architecture methods).
"""
from distill_pair import parse_args, run_pair

if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], epochs=3)  # OFA's branch heads make each step slow on a CPU
    # the ViT's patch grid and position embeddings follow the input size
    run_pair(args, "tv_teacher.yaml", "cnn_to_vit.yaml", "vit", [f"student.options.image_size={args.image_size}"])
