"""The presentation contexts the node accepts, and their per-association copy."""

from __future__ import annotations

import copy

from pynetdicom import AllStoragePresentationContexts
from pynetdicom.presentation import negotiate_as_acceptor

from dicomnode.config import load_config
from dicomnode.scp import TRANSFER_SYNTAXES, SharedUIDContexts, build_ae
from pipelines.series import PRIVATE_STORAGE_CLASSES
from tests.nodeutil import write_config


def test_every_storage_class_is_accepted_in_every_syntax(tmp_path):
    ae = build_ae(load_config(write_config(tmp_path / "node.toml", 11112, tmp_path / "var")))
    supported = {str(c.abstract_syntax): c for c in ae.supported_contexts}
    wanted = {str(c.abstract_syntax) for c in AllStoragePresentationContexts}
    assert wanted | set(PRIVATE_STORAGE_CLASSES) <= set(supported)
    for uid in wanted | set(PRIVATE_STORAGE_CLASSES):
        assert set(supported[uid].transfer_syntax) == set(TRANSFER_SYNTAXES)
        assert (supported[uid].scu_role, supported[uid].scp_role) == (True, True)  # C-GET


def test_the_per_association_copy_shares_uids_and_negotiates_the_same(tmp_path):
    """pynetdicom deep-copies the server's contexts for each association: the copy must
    be independent and equal, only its (immutable) UIDs shared."""
    ae = build_ae(load_config(write_config(tmp_path / "node.toml", 11112, tmp_path / "var")))
    contexts = SharedUIDContexts(ae.supported_contexts)
    copied = copy.deepcopy(contexts)
    assert len(copied) == len(contexts)
    for mine, theirs in zip(contexts, copied, strict=True):
        assert mine is not theirs and mine.transfer_syntax is not theirs.transfer_syntax
        assert mine.abstract_syntax is theirs.abstract_syntax
        assert (str(mine), mine.scu_role, mine.scp_role) == (
            str(theirs), theirs.scu_role, theirs.scp_role)
    copied[1].transfer_syntax.pop()
    assert len(contexts[1].transfer_syntax) == len(copied[1].transfer_syntax) + 1
    requested = copy.deepcopy(AllStoragePresentationContexts[:100])
    for number, context in enumerate(requested):
        context.context_id = 2 * number + 1
    plain, _ = negotiate_as_acceptor(requested, ae.supported_contexts)
    shared, _ = negotiate_as_acceptor(requested, copy.deepcopy(contexts))
    assert [(c.result, c.transfer_syntax) for c in shared] == [
        (c.result, c.transfer_syntax) for c in plain]
    assert all(c.result == 0x00 for c in shared)
