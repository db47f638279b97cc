"""The MicroteLedger contract on a real in-process EVM (eth-tester over py-evm): anchors,
ERC20 tokens, settlement in one transaction, and the chain kept in a file."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_tester.exceptions import TransactionFailed
from hypothesis import given
from hypothesis import strategies as st
from ledger_samples import T0, every_kind
from web3.exceptions import ContractLogicError

from ledger import merkle
from ledger.evm import (
    ARTIFACT,
    CLEARING_ADDRESS,
    ChainError,
    ChainStore,
    EvmAnchor,
    money_deltas,
    net_transfers,
    participant_address,
)

# A revert with a custom error: web3 raises ContractLogicError, or eth-tester's own exception.
REVERTS = (ContractLogicError, TransactionFailed)


@pytest.fixture
def chain() -> Iterator[EvmAnchor]:
    anchor = EvmAnchor.in_process()
    anchor.deploy()
    yield anchor
    anchor.close()


def transactions_in_blocks(anchor: EvmAnchor, after: int) -> list[int]:
    """Transactions per block mined after block `after`."""
    head = anchor.w3.eth.get_block("latest")["number"]
    return [len(anchor.w3.eth.get_block(n)["transactions"]) for n in range(after + 1, head + 1)]


def head(anchor: EvmAnchor) -> int:
    return int(anchor.w3.eth.get_block("latest")["number"])


def test_artifact_is_compiled_from_the_source() -> None:
    artifact = json.loads(ARTIFACT.read_text())
    source = (ARTIFACT.parent / "MicroteLedger.sol").read_bytes()
    assert artifact["sourceSha256"] == hashlib.sha256(source).hexdigest(), "run contracts/compile.py"
    assert artifact["compiler"]["package"].startswith("solc@0.8.")
    assert artifact["bytecode"].startswith("0x60") and len(artifact["deployedBytecode"]) > 1000


def test_anchor_is_one_transaction_and_stored(chain: EvmAnchor) -> None:
    before = head(chain)
    root = hashlib.sha256(b"batch 1").digest()
    result = chain.anchor(root, (1_700_000_000, 1_700_000_900), 42)
    assert (result.index, result.transactions, result.settle_parts) == (0, 1, 0)
    assert transactions_in_blocks(chain, before) == [1]
    stored = chain.get_anchor(0)
    assert (stored.root, stored.interval_start, stored.interval_end, stored.records) == (
        root,
        1_700_000_000,
        1_700_000_900,
        42,
    )
    assert stored.block == result.block
    assert chain.anchor_index(root) == 0 and chain.anchor_count() == 1
    assert chain.anchor_tx(root) == (result.tx_hash, result.block)
    # Anchored is an event with the root indexed
    (event,) = chain.contract.events.Anchored.get_logs(from_block=0)
    assert event["args"]["root"] == root and event["args"]["records"] == 42

    # Anchoring the same root again sends nothing (a retry after a lost receipt) ...
    again = chain.anchor(root, (1_700_000_000, 1_700_000_900), 42)
    assert (again.index, again.transactions, again.tx_hash) == (0, 0, result.tx_hash)
    assert chain.anchor_count() == 1
    # ... and the contract refuses a second anchor of one root outright.
    with pytest.raises(REVERTS):
        chain.contract.functions.anchor(root, 1, 2, 3).transact({"from": chain.sender})
    with pytest.raises(REVERTS):  # interval backwards
        chain.contract.functions.anchor(os.urandom(32), 5, 4, 1).transact({"from": chain.sender})


def test_only_the_operator_anchors_mints_and_settles(chain: EvmAnchor) -> None:
    stranger = chain.w3.eth.accounts[3]
    fn = chain.contract.functions
    for call in (
        fn.anchor(os.urandom(32), 1, 2, 3),
        fn.mint(stranger, 5),
        fn.settle([stranger], [chain.sender], [1]),
        fn.setOperator(stranger),
    ):
        with pytest.raises(REVERTS):
            call.transact({"from": stranger})
    assert chain.operator() == chain.sender


def test_erc20_interface(chain: EvmAnchor) -> None:
    fn = chain.contract.functions
    alice, bob, carol = chain.w3.eth.accounts[1:4]
    assert (fn.name().call(), fn.symbol().call(), fn.decimals().call()) == ("microte energy credit", "MTE", 6)
    chain.mint(alice, 1_000_000)
    assert fn.totalSupply().call() == 1_000_000 and chain.balance(alice) == 1_000_000
    assert fn.transfer(bob, 250_000).call({"from": alice}) is True
    fn.transfer(bob, 250_000).transact({"from": alice})
    assert (chain.balance(alice), chain.balance(bob)) == (750_000, 250_000)
    with pytest.raises(REVERTS):  # more than it has
        fn.transfer(bob, 750_001).transact({"from": alice})
    fn.approve(carol, 100_000).transact({"from": alice})
    assert fn.allowance(alice, carol).call() == 100_000
    fn.transferFrom(alice, bob, 60_000).transact({"from": carol})
    assert fn.allowance(alice, carol).call() == 40_000
    with pytest.raises(REVERTS):  # beyond the allowance
        fn.transferFrom(alice, bob, 40_001).transact({"from": carol})
    assert (chain.balance(alice), chain.balance(bob), fn.totalSupply().call()) == (690_000, 310_000, 1_000_000)
    transfers = chain.contract.events.Transfer.get_logs(from_block=0)
    assert [(e["args"]["from"], e["args"]["to"], e["args"]["value"]) for e in transfers][-1] == (alice, bob, 60_000)
    (approval,) = chain.contract.events.Approval.get_logs(from_block=0)
    assert approval["args"]["value"] == 100_000


def test_settle_many_transfers_in_one_transaction_with_credit(chain: EvmAnchor) -> None:
    a, b, c = (participant_address(p) for p in ("A", "B", "C"))
    chain.mint(a, 500)
    before = head(chain)
    chain.settle([(a, b, 300), (b, c, 100), (c, a, 1_000)])  # C pays 1,000 it lacks: credit 900
    assert transactions_in_blocks(chain, before) == [1]
    assert (chain.balance(a), chain.balance(b), chain.balance(c)) == (1_200, 200, 0)
    assert (chain.credit(a), chain.credit(b), chain.credit(c)) == (0, 0, 900)
    assert (chain.position(a), chain.position(b), chain.position(c)) == (1_200, 200, -900)
    assert chain.contract.functions.totalSupply().call() == 1_400
    (credit,) = chain.contract.events.Credit.get_logs(from_block=0)
    assert (credit["args"]["account"], credit["args"]["value"]) == (c, 900)


def test_anchor_with_settlement_in_parts(chain: EvmAnchor) -> None:
    chain.max_transfers = 4
    deltas = {f"P{i}": (-1) ** i * (100 + i) for i in range(9)}
    deltas[""] = -sum(deltas.values())  # what the clearing account keeps
    transfers = net_transfers(deltas)
    assert len(transfers) == 9
    root = os.urandom(32)
    before = head(chain)
    result = chain.anchor(root, (10, 20), 9, transfers)
    assert (result.transactions, result.settle_parts) == (3, 3)  # anchorAndSettle + 2 settlePart
    assert transactions_in_blocks(chain, before) == [1, 1, 1]
    assert chain.settled_parts(root) == 3
    for pid, delta in deltas.items():
        assert chain.position(participant_address(pid) if pid else CLEARING_ADDRESS) == delta
    # a retry settles nothing twice
    assert chain.anchor(root, (10, 20), 9, transfers).transactions == 0
    with pytest.raises(REVERTS):  # a part out of order
        chain.contract.functions.settlePart(root, 1, [], [], []).transact({"from": chain.sender})


@given(
    st.lists(
        st.tuples(st.sampled_from(["H1", "H2", "H3", "grid"]), st.sampled_from(["H1", "H2", "H3", "grid"])),
        max_size=12,
    ),
    st.data(),
)
def test_netting_conserves_money(pairs: list[tuple[str, str]], data: st.DataObject) -> None:
    rows = []
    for i, (seller, buyer) in enumerate(pairs):
        buy = data.draw(st.integers(-(10**9), 10**9))
        sell = data.draw(st.integers(-(10**9), buy))  # the buyer pays at least what the seller gets
        rows.append(
            (
                "transactions",
                {"id": str(i), "seller_id": seller, "buyer_id": buyer, "amount_buy": buy, "amount_sell": sell},
            )
        )
    deltas = money_deltas(rows)
    assert sum(deltas.values()) == 0
    positions: dict[str, int] = {}
    for frm, to, amount in net_transfers(deltas):
        assert amount > 0 and CLEARING_ADDRESS in (frm, to)
        positions[frm] = positions.get(frm, 0) - amount
        positions[to] = positions.get(to, 0) + amount
    for pid, delta in deltas.items():
        assert positions.get(participant_address(pid) if pid else CLEARING_ADDRESS, 0) == delta


def test_money_of_every_table() -> None:
    rows = [
        ("transactions", {"seller_id": "S", "buyer_id": "B", "amount_buy": 110, "amount_sell": 100}),
        ("transactions", {"seller_id": "S", "buyer_id": "S", "amount_buy": 0, "amount_sell": 0}),  # self
        ("token_transfers", {"payer_id": "B", "payee_id": "AGG", "amount": 7}),
        ("flex_tokens", {"from_id": "AGG", "to_id": "S", "amount": 3}),
        ("meters", {"participant_id": "S"}),
    ]
    assert money_deltas(rows) == {"B": -117, "S": 103, "": 10, "AGG": 4}
    assert participant_address("H01") == participant_address("H01") != participant_address("H02")
    assert participant_address("grid").startswith("0x") and len(participant_address("grid")) == 42


def test_attach_checks_the_code(chain: EvmAnchor) -> None:
    other = EvmAnchor(chain.w3, account=chain.account)
    other.attach(chain.address)
    assert other.anchor_count() == 0
    with pytest.raises(ChainError, match="no contract"):
        other.attach(chain.w3.eth.accounts[5])


def test_chain_kept_in_a_file(tmp_path: Path) -> None:
    state = tmp_path / "chain.evm"
    first = EvmAnchor.in_process(state)
    address, _, _ = first.deploy()
    genesis = first.genesis_hash()
    root = os.urandom(32)
    first.anchor(root, (1, 2), 3, [(participant_address("A"), CLEARING_ADDRESS, 5)])
    with pytest.raises(RuntimeError, match="in use"):  # one writer at a time
        ChainStore(state)
    reader = EvmAnchor.in_process(state, readonly=True)  # readers take no lock
    reader.attach(address)
    assert reader.anchor_index(root) == 0
    reader.close()
    first.close()

    again = EvmAnchor.in_process(state)
    assert again.genesis_hash() == genesis
    again.attach(address)
    assert again.anchor_index(root) == 0 and again.position(participant_address("A")) == -5
    assert again.anchor(os.urandom(32), (3, 4), 1).index == 1  # the chain goes on
    again.close()
    with pytest.raises(FileNotFoundError):
        EvmAnchor.in_process(tmp_path / "none.evm", readonly=True)


def test_anchor_records_without_a_database(chain: EvmAnchor) -> None:
    batch = every_kind()
    before = head(chain)
    result = chain.anchor_records(batch.records)
    assert transactions_in_blocks(chain, before) == [1]
    stored = chain.get_anchor(result.index)
    leaves = sorted(
        (r.TABLE, str(r.row()["commit_id" if r.TABLE == "settlements" else "id"]), merkle.record_leaf(r.TABLE, r.row()))
        for r in batch.records
    )
    assert stored.root == merkle.root([leaf for *_, leaf in leaves])
    assert (stored.interval_start, stored.interval_end, stored.records) == (T0, T0 + 900, len(batch))
    assert result.settle_parts == 1
    for pid, money in money_deltas((r.TABLE, r.row()) for r in batch.records).items():
        assert chain.position(participant_address(pid) if pid else CLEARING_ADDRESS) == money
