"""timm teacher -> timm student (ResNet-18 -> MobileNetV3-small-050, KD) on an ImageFolder; needs timm.

    python examples/timm_pair.py                                        # generated data, seconds on a CPU
    python examples/timm_pair.py --data /path/to/images --image-size 64 --epochs 30 --teacher-epochs 30

The configs are examples/configs/timm_teacher.yaml and timm_student.yaml.
"""
from distill_pair import parse_args, run_pair

if __name__ == "__main__":
    run_pair(parse_args(__doc__.splitlines()[0]), "timm_teacher.yaml", "timm_student.yaml", "timm")
