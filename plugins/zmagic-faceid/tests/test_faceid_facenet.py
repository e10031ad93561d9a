"""facenet-pytorch's InceptionResnetV1: a checkpoint in the released format (with its classifier
head) loads through the plugin and gives a working energy."""
import torch

from zmagic_core import BuildContext, load_image
from zmagic_faceid.energy import build_faceid
from zmagic_faceid.faces import crop_resize

CTX = BuildContext()


def calibrate_last_batchnorm(net, images):
    """Set the final BatchNorm's statistics from a few inputs, as training would: without it a
    randomly initialised InceptionResnetV1 maps every image to nearly the same embedding."""
    feats = []
    hook = net.last_linear.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        net(images)
    hook.remove()
    f = feats[0]
    net.last_bn.running_mean.copy_(f.mean(0))
    net.last_bn.running_var.copy_(f.var(0) + 1e-3)


def test_facenet_checkpoint_with_classifier_head_loads_and_gives_an_energy(tmp_path, astronaut_png, other_png, randomised):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(1)
    net = InceptionResnetV1(pretrained=None).eval()
    randomised(net)
    images = torch.stack([load_image(astronaut_png, 256), load_image(other_png, 256)])
    calibrate_last_batchnorm(net, torch.cat([crop_resize(images, (0.3, 0.05, 0.6, 0.4), 160),
                                             torch.rand(2, 3, 160, 160) * 2 - 1]))
    state = dict(net.state_dict())
    state["logits.weight"] = torch.zeros(8631, 512)  # the vggface2 release carries its classifier
    state["logits.bias"] = torch.zeros(8631)
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(state, path)
    energy = build_faceid(CTX, reference=str(astronaut_png), backbone="facenet", weights=str(path))
    assert energy.input_size == 160
    images.requires_grad_(True)
    e = energy(images)
    assert e[0] < 1e-5 and e[1] > 1e-3
    (grad,) = torch.autograd.grad(e.sum(), images)
    assert torch.isfinite(grad).all() and grad[1].abs().sum() > 0
