"""torchvision teacher -> torchvision student on an ImageFolder (ResNet-18 -> MobileNetV2, KD + FitNet).

    python examples/torchvision_imagefolder.py                         # generated data, seconds on a CPU
    python examples/torchvision_imagefolder.py --data /path/to/images --image-size 64 --epochs 30 --teacher-epochs 30

The configs are examples/configs/tv_teacher.yaml and tv_student.yaml; edit them or pass KEY=VALUE overrides
to the printed kdzoo commands.
"""
from distill_pair import parse_args, run_pair

if __name__ == "__main__":
    run_pair(parse_args(__doc__.splitlines()[0]), "tv_teacher.yaml", "tv_student.yaml", "tv")
