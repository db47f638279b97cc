// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title microte ledger anchor and settlement token
/// @notice (a) Anchors the ledger: one Merkle root per batch of ledger records (one round),
///         with the interval it covers and its record count. The chain keeps only roots; the
///         records stay in the database (docs/chain.md).
///         (b) An ERC20-compatible token in micro-currency (6 decimals, like the ledger's
///         integer amounts). The operator settles a batch's money in one transaction.
/// @dev Settlement is custodial: participants' addresses are derived from their registry ids
///      and the operator moves their tokens. A payer whose balance does not cover a settlement
///      draws credit: the shortfall is minted to it and counted in `creditOf`, so that
///      `balanceOf(a) - creditOf(a)` is the account's net position, which may be negative.
contract MicroteLedger {
    // -- ERC20 ------------------------------------------------------------------------------

    string public constant name = "microte energy credit";
    string public constant symbol = "MTE";
    uint8 public constant decimals = 6;

    uint256 public totalSupply;
    mapping(address => uint256) public balanceOf;
    mapping(address => mapping(address => uint256)) public allowance;
    /// Tokens minted to an account to cover settlements it could not pay (its debt).
    mapping(address => uint256) public creditOf;

    event Transfer(address indexed from, address indexed to, uint256 value);
    event Approval(address indexed owner, address indexed spender, uint256 value);
    event Credit(address indexed account, uint256 value);

    // -- anchors ----------------------------------------------------------------------------

    struct Anchor {
        bytes32 root;
        uint64 intervalStart;
        uint64 intervalEnd;
        uint32 records;
        uint64 blockNumber;
    }

    Anchor[] private _anchors;
    /// index + 1 of the anchor of a root; 0: not anchored. A root is anchored once.
    mapping(bytes32 => uint256) public anchorIndex;
    /// Settlement parts done for an anchored root (a large batch settles in several parts).
    mapping(bytes32 => uint32) public settledParts;

    event Anchored(
        uint256 indexed index, bytes32 indexed root, uint64 intervalStart, uint64 intervalEnd, uint32 records
    );
    event Settled(bytes32 indexed root, uint32 part, uint256 transfers);

    // -- operator ---------------------------------------------------------------------------

    address public operator;

    event OperatorChanged(address indexed previous, address indexed next);

    error NotOperator(address caller);
    error ZeroAddress();
    error AlreadyAnchored(bytes32 root, uint256 index);
    error NotAnchored(bytes32 root);
    error WrongPart(bytes32 root, uint32 expected, uint32 given);
    error BadInterval(uint64 intervalStart, uint64 intervalEnd);
    error LengthMismatch();
    error InsufficientBalance(address account, uint256 balance, uint256 needed);
    error InsufficientAllowance(address owner, address spender, uint256 allowance, uint256 needed);

    modifier onlyOperator() {
        if (msg.sender != operator) revert NotOperator(msg.sender);
        _;
    }

    constructor() {
        operator = msg.sender;
        emit OperatorChanged(address(0), msg.sender);
    }

    function setOperator(address next) external onlyOperator {
        if (next == address(0)) revert ZeroAddress();
        emit OperatorChanged(operator, next);
        operator = next;
    }

    // -- anchoring --------------------------------------------------------------------------

    /// Anchor one batch: its Merkle root, the interval it covers and its record count.
    function anchor(bytes32 root, uint64 intervalStart, uint64 intervalEnd, uint32 records)
        external
        onlyOperator
        returns (uint256 index)
    {
        return _anchor(root, intervalStart, intervalEnd, records);
    }

    /// Anchor one batch and settle its money (part 0) in the same transaction.
    function anchorAndSettle(
        bytes32 root,
        uint64 intervalStart,
        uint64 intervalEnd,
        uint32 records,
        address[] calldata from,
        address[] calldata to,
        uint256[] calldata amounts
    ) external onlyOperator returns (uint256 index) {
        index = _anchor(root, intervalStart, intervalEnd, records);
        _settleMany(from, to, amounts);
        settledParts[root] = 1;
        emit Settled(root, 0, amounts.length);
    }

    /// A further settlement part of an anchored batch (parts are settled in order, once).
    function settlePart(
        bytes32 root,
        uint32 part,
        address[] calldata from,
        address[] calldata to,
        uint256[] calldata amounts
    ) external onlyOperator {
        if (anchorIndex[root] == 0) revert NotAnchored(root);
        uint32 expected = settledParts[root];
        if (part != expected) revert WrongPart(root, expected, part);
        _settleMany(from, to, amounts);
        settledParts[root] = expected + 1;
        emit Settled(root, part, amounts.length);
    }

    function anchorCount() external view returns (uint256) {
        return _anchors.length;
    }

    function anchors(uint256 index)
        external
        view
        returns (bytes32 root, uint64 intervalStart, uint64 intervalEnd, uint32 records, uint64 blockNumber)
    {
        Anchor storage a = _anchors[index];
        return (a.root, a.intervalStart, a.intervalEnd, a.records, a.blockNumber);
    }

    function _anchor(bytes32 root, uint64 intervalStart, uint64 intervalEnd, uint32 records)
        internal
        returns (uint256 index)
    {
        uint256 known = anchorIndex[root];
        if (known != 0) revert AlreadyAnchored(root, known - 1);
        if (intervalEnd < intervalStart) revert BadInterval(intervalStart, intervalEnd);
        index = _anchors.length;
        _anchors.push(Anchor(root, intervalStart, intervalEnd, records, uint64(block.number)));
        anchorIndex[root] = index + 1;
        emit Anchored(index, root, intervalStart, intervalEnd, records);
    }

    // -- tokens: operator -------------------------------------------------------------------

    function mint(address to, uint256 amount) external onlyOperator {
        if (to == address(0)) revert ZeroAddress();
        totalSupply += amount;
        balanceOf[to] += amount;
        emit Transfer(address(0), to, amount);
    }

    /// Many transfers in one transaction: `amounts[i]` from `from[i]` to `to[i]`, in order.
    function settle(address[] calldata from, address[] calldata to, uint256[] calldata amounts)
        external
        onlyOperator
    {
        _settleMany(from, to, amounts);
    }

    function _settleMany(address[] calldata from, address[] calldata to, uint256[] calldata amounts) internal {
        uint256 n = amounts.length;
        if (from.length != n || to.length != n) revert LengthMismatch();
        for (uint256 i = 0; i < n; ++i) {
            address payer = from[i];
            uint256 amount = amounts[i];
            uint256 balance = balanceOf[payer];
            if (balance < amount) {
                // The payer draws credit for what it lacks: minted to it, counted as debt.
                uint256 shortfall = amount - balance;
                creditOf[payer] += shortfall;
                totalSupply += shortfall;
                balanceOf[payer] = amount;
                emit Transfer(address(0), payer, shortfall);
                emit Credit(payer, shortfall);
            }
            _transfer(payer, to[i], amount);
        }
    }

    // -- tokens: ERC20 ----------------------------------------------------------------------

    function transfer(address to, uint256 amount) external returns (bool) {
        _transfer(msg.sender, to, amount);
        return true;
    }

    function approve(address spender, uint256 amount) external returns (bool) {
        if (spender == address(0)) revert ZeroAddress();
        allowance[msg.sender][spender] = amount;
        emit Approval(msg.sender, spender, amount);
        return true;
    }

    function transferFrom(address from, address to, uint256 amount) external returns (bool) {
        uint256 allowed = allowance[from][msg.sender];
        if (allowed != type(uint256).max) {
            if (allowed < amount) revert InsufficientAllowance(from, msg.sender, allowed, amount);
            allowance[from][msg.sender] = allowed - amount;
        }
        _transfer(from, to, amount);
        return true;
    }

    function _transfer(address from, address to, uint256 amount) internal {
        if (to == address(0)) revert ZeroAddress();
        uint256 balance = balanceOf[from];
        if (balance < amount) revert InsufficientBalance(from, balance, amount);
        unchecked {
            balanceOf[from] = balance - amount;
        }
        balanceOf[to] += amount;
        emit Transfer(from, to, amount);
    }
}
