"""The compiled fill loop of :mod:`moondev_lab.broker`: backtesting.py 0.6.6's ``_Broker``, in numba.

Every function mirrors one method of ``backtesting.backtesting._Broker`` (named in its
docstring), down to the order of floating-point operations and Python's quirks
(list iteration that skips the element after a removed one, ``int + float``
sizes), because settlement must agree with backtesting.py *exactly*.

The broker's state is a handful of flat arrays (see :data:`QF`, :data:`QI`,
:data:`TF`, :data:`TI`, :data:`CNT`, :data:`ACC`), so that it can be copied,
stored (SQLite, JSON) and resumed between bars. ``run_bars`` is the batch loop;
``next_bar`` and ``apply_event`` are the per-bar steps a paper exchange drives.

The numba cache goes under ``$MOONDEV_LAB_HOME``, one directory per hash of the kernel
sources (see :func:`_cache_dir`), so that a compile is paid once per install, not once
per process, and never outlives the code it was compiled from.
"""
from __future__ import annotations

import os

from ._numba_cache import STALE_CACHE_SECONDS, KERNEL_SOURCES, kernel_key, keyed_cache_dir  # noqa: F401


def _cache_dir() -> None:
    """Point numba's cache at ``$MOONDEV_LAB_HOME/numba-cache/<kernel_key()>`` unless the user chose one.

    numba checks a cached function against its own file's timestamp only, so a change to
    the fill rules here would leave ``_fast_kernel``'s cached loop running the old ones;
    a directory per source hash makes any change compile afresh.
    ``NUMBA_CACHE_DIR`` is read when numba is imported; if numba is already imported,
    its config is set the same way (caching reads it when a function is decorated).
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    from . import config

    path = keyed_cache_dir(config.home() / "numba-cache", kernel_key())
    if path is None:
        return  # read-only home: numba falls back to its own locations
    os.environ["NUMBA_CACHE_DIR"] = str(path)
    import sys

    if "numba" in sys.modules:
        from numba.core import config as nb_config

        if not nb_config.CACHE_DIR:
            nb_config.CACHE_DIR = str(path)


_cache_dir()

import math  # noqa: E402

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

# ---------------------------------------------------------------- state layout
# Order queue, in queue order: floats QF[row] and ints QI[row].
Q_SIZE, Q_LIMIT, Q_STOP, Q_SL, Q_TP = range(5)
QF = 5
Q_ORD, Q_TRADE, Q_KIND, Q_TAG = range(4)
QI = 4
#: Order kinds: a stand-alone order, a trade's stop-loss / take-profit, a Trade.close() order.
K_ORDER, K_SL, K_TP, K_CLOSE = range(4)

# Every Trade object ever created, indexed by its ordinal.
T_SIZE, T_ENTRY, T_EXIT, T_COMM, T_SL, T_TP = range(6)
TF = 6
T_ENTRY_BAR, T_EXIT_BAR, T_SL_ORD, T_TP_ORD, T_TAG, T_FLOAT = range(6)
TI = 6

# Counters.
C_NQ, C_NTRADES, C_NACTIVE, C_NCLOSED, C_NEXT_ORD, C_STOPPED, C_MARGIN_CANCELS, C_DEFERRED = range(8)
CNT = 8
A_CASH = 0
ACC = 1

# Events of an order log (what the strategy decided).
E_NEW, E_CONTINGENT, E_CLOSE, E_CANCEL = range(4)

# Statuses. Negative ones mean the order log is not one backtesting.py could have produced.
OK, NEED_ROOM, OUT_OF_MONEY = 0, 1, 2
BAD_REF, BAD_ORDER, BAD_STATE, BAD_EVENT = -1, -2, -3, -4
STATUS_TEXT = {
    BAD_REF: "an event refers to a trade or order that does not exist (or is no longer queued)",
    BAD_ORDER: "an order violates backtesting.py's SL < price < TP rule (it raised ValueError there)",
    BAD_STATE: "the orders lead to a state in which backtesting.py itself fails an assertion",
    BAD_EVENT: "an event is malformed (kind, size, bar order or contingent fields)",
}


def new_state(order_cap: int = 16, trade_cap: int = 64) -> dict:
    """Empty broker state arrays (cash is set by the caller)."""
    return {"qf": np.full((order_cap, QF), np.nan), "qi": np.full((order_cap, QI), -1, np.int64),
            "tf": np.full((trade_cap, TF), np.nan), "ti": np.full((trade_cap, TI), -1, np.int64),
            "active": np.full(trade_cap, -1, np.int64), "closed": np.full(trade_cap, -1, np.int64),
            "cnt": np.zeros(CNT, np.int64), "acc": np.zeros(ACC)}


def grow(state: dict) -> dict:
    """The same state with room for twice as many queued orders and trades."""
    out = dict(state)
    for key, fill in (("qf", np.nan), ("qi", -1), ("tf", np.nan), ("ti", -1), ("active", -1), ("closed", -1)):
        old = state[key]
        new = np.full((old.shape[0] * 2,) + old.shape[1:], fill, old.dtype)
        new[:old.shape[0]] = old
        out[key] = new
    return out


# ---------------------------------------------------------------- small helpers
@njit(cache=True, inline="always")
def _set(x):  # backtesting.py tests prices for truth: None and 0 mean "not set"
    return not math.isnan(x) and x != 0.0


@njit(cache=True, inline="always")
def _commission(size, price, fixed, rel):
    """``_Broker._commission_func``."""
    return fixed + abs(size) * price * rel


@njit(cache=True, inline="always")
def _find(qi, nq, ordinal):
    for r in range(nq):
        if qi[r, Q_ORD] == ordinal:
            return r
    return -1


@njit(cache=True)
def _remove_row(qf, qi, cnt, r):
    nq = cnt[C_NQ]
    for k in range(r, nq - 1):
        qf[k] = qf[k + 1]
        qi[k] = qi[k + 1]
    qf[nq - 1] = np.nan
    qi[nq - 1] = -1
    cnt[C_NQ] = nq - 1


@njit(cache=True)
def _insert_row(qf, qi, cnt, at_front, size, limit, stop, sl, tp, trade, kind, tag):
    """``orders.insert(0 or len, Order(...))``; the order gets the next ordinal."""
    nq = cnt[C_NQ]
    r = nq
    if at_front:
        for k in range(nq, 0, -1):
            qf[k] = qf[k - 1]
            qi[k] = qi[k - 1]
        r = 0
    qf[r, Q_SIZE] = size
    qf[r, Q_LIMIT] = limit
    qf[r, Q_STOP] = stop
    qf[r, Q_SL] = sl
    qf[r, Q_TP] = tp
    ordinal = cnt[C_NEXT_ORD]
    qi[r, Q_ORD] = ordinal
    qi[r, Q_TRADE] = trade
    qi[r, Q_KIND] = kind
    qi[r, Q_TAG] = tag
    cnt[C_NEXT_ORD] = ordinal + 1
    cnt[C_NQ] = nq + 1
    return ordinal


@njit(cache=True, inline="always")
def _is_active(active, cnt, t):
    for k in range(cnt[C_NACTIVE]):
        if active[k] == t:
            return True
    return False


@njit(cache=True)
def _remove_active(active, cnt, t):
    n = cnt[C_NACTIVE]
    for k in range(n):
        if active[k] == t:
            for m in range(k, n - 1):
                active[m] = active[m + 1]
            active[n - 1] = -1
            cnt[C_NACTIVE] = n - 1
            return True
    return False


@njit(cache=True, inline="always")
def _equity(tf, active, cnt, acc, last):
    """``_Broker.equity``: cash + ``_position_unrealized_pl``."""
    pos = 0
    basis = 0.0
    for k in range(cnt[C_NACTIVE]):
        t = active[k]
        pos += int(tf[t, T_SIZE])
        basis += tf[t, T_SIZE] * tf[t, T_ENTRY]
    return acc[A_CASH] + (last * pos - basis)


@njit(cache=True)
def _margin_available(tf, active, cnt, acc, last, leverage):
    """``_Broker.margin_available``."""
    used = 0.0
    for k in range(cnt[C_NACTIVE]):
        t = active[k]
        used += abs(tf[t, T_SIZE]) * last / leverage
    avail = _equity(tf, active, cnt, acc, last) - used
    return avail if avail > 0 else 0.0


@njit(cache=True)
def _close_order_size(size):
    """``Trade.close(1)``'s order size: ``copysign(max(1, int(round(abs(size)))), -size)``."""
    units = float(max(1, int(round(abs(size)))))
    return -units if size > 0 else units


# ---------------------------------------------------------------- trades
@njit(cache=True)
def _close_trade(qf, qi, tf, ti, active, closed, cnt, acc, t, price, bar, fixed, rel):
    """``_Broker._close_trade``."""
    if not _remove_active(active, cnt, t):
        return BAD_STATE
    for col in (T_SL_ORD, T_TP_ORD):
        o = ti[t, col]
        if o >= 0:
            r = _find(qi, cnt[C_NQ], o)
            if r < 0:
                return BAD_STATE  # list.remove(): ValueError in backtesting.py
            _remove_row(qf, qi, cnt, r)
    tf[t, T_EXIT] = price
    ti[t, T_EXIT_BAR] = bar
    closed[cnt[C_NCLOSED]] = t
    cnt[C_NCLOSED] += 1
    size = tf[t, T_SIZE]
    commission = _commission(size, price, fixed, rel)
    acc[A_CASH] += (size * (price - tf[t, T_ENTRY]) - 0.0) - commission
    tf[t, T_COMM] = commission + _commission(size, tf[t, T_ENTRY], fixed, rel)
    return OK


@njit(cache=True)
def _reduce_trade(qf, qi, tf, ti, active, closed, cnt, acc, t, price, size, size_float, bar, fixed, rel):
    """``_Broker._reduce_trade``: a partial close closes a reduced copy of the trade."""
    if not (tf[t, T_SIZE] * size < 0 and abs(tf[t, T_SIZE]) >= abs(size)):
        return BAD_STATE
    left = tf[t, T_SIZE] + size
    target = t
    if left != 0:
        tf[t, T_SIZE] = left
        ti[t, T_FLOAT] = 1 if (ti[t, T_FLOAT] == 1 or size_float) else 0
        for col in (T_SL_ORD, T_TP_ORD):
            o = ti[t, col]
            if o >= 0:
                r = _find(qi, cnt[C_NQ], o)
                if r >= 0:
                    qf[r, Q_SIZE] = -left
        c = cnt[C_NTRADES]  # trade._copy(size=-size, sl_order=None, tp_order=None)
        tf[c] = tf[t]
        ti[c] = ti[t]
        tf[c, T_SIZE] = -size
        tf[c, T_SL] = np.nan
        tf[c, T_TP] = np.nan
        ti[c, T_SL_ORD] = -1
        ti[c, T_TP_ORD] = -1
        ti[c, T_FLOAT] = 1 if size_float else 0
        cnt[C_NTRADES] = c + 1
        active[cnt[C_NACTIVE]] = c
        cnt[C_NACTIVE] += 1
        target = c
    return _close_trade(qf, qi, tf, ti, active, closed, cnt, acc, target, price, bar, fixed, rel)


@njit(cache=True)
def _set_contingent(qf, qi, tf, ti, cnt, t, is_sl, price, last, spread):
    """``Trade.sl = price`` / ``Trade.tp = price`` on a trade with no such order yet."""
    if not 0 < price < np.inf:
        return BAD_STATE  # Trade.__set_contingent's assert
    size = -tf[t, T_SIZE]
    nan = np.nan
    if is_sl:
        status = _check_order(size, nan, price, nan, nan, last, spread)
        if status != OK:
            return status
        o = _insert_row(qf, qi, cnt, True, size, nan, price, nan, nan, t, K_SL, ti[t, T_TAG])
        ti[t, T_SL_ORD] = o
        tf[t, T_SL] = price
    else:
        status = _check_order(size, price, nan, nan, nan, last, spread)
        if status != OK:
            return status
        o = _insert_row(qf, qi, cnt, False, size, price, nan, nan, nan, t, K_TP, ti[t, T_TAG])
        ti[t, T_TP_ORD] = o
        tf[t, T_TP] = price
    return OK


@njit(cache=True)
def _open_trade(qf, qi, tf, ti, active, cnt, acc, price, size, size_float, sl, tp, bar, tag,
                last, spread, fixed, rel):
    """``_Broker._open_trade``: the trade, its entry commission, then TP and SL orders."""
    t = cnt[C_NTRADES]
    tf[t] = np.nan
    tf[t, T_SIZE] = size
    tf[t, T_ENTRY] = price
    tf[t, T_COMM] = 0.0
    ti[t, T_ENTRY_BAR] = bar
    ti[t, T_EXIT_BAR] = -1
    ti[t, T_SL_ORD] = -1
    ti[t, T_TP_ORD] = -1
    ti[t, T_TAG] = tag
    ti[t, T_FLOAT] = 1 if size_float else 0
    cnt[C_NTRADES] = t + 1
    active[cnt[C_NACTIVE]] = t
    cnt[C_NACTIVE] += 1
    acc[A_CASH] -= _commission(size, price, fixed, rel)
    if _set(tp):
        status = _set_contingent(qf, qi, tf, ti, cnt, t, False, tp, last, spread)
        if status != OK:
            return status
    if _set(sl):
        status = _set_contingent(qf, qi, tf, ti, cnt, t, True, sl, last, spread)
        if status != OK:
            return status
    return OK


# ---------------------------------------------------------------- orders
@njit(cache=True)
def _check_order(size, limit, stop, sl, tp, last, spread):
    """``_Broker.new_order``'s ValueError rule: SL < LIMIT/STOP/price < TP (reversed for shorts)."""
    if size == 0 or math.isnan(size):
        return BAD_EVENT
    adjusted = last * (1 + math.copysign(spread, size))
    ref = limit if _set(limit) else (stop if _set(stop) else adjusted)
    if size > 0:
        lo = sl if _set(sl) else -np.inf
        hi = tp if _set(tp) else np.inf
    else:
        lo = tp if _set(tp) else -np.inf
        hi = sl if _set(sl) else np.inf
    return OK if lo < ref < hi else BAD_ORDER


@njit(cache=True)
def _process_orders(qf, qi, tf, ti, active, closed, cnt, acc, o_, h, l_, c, prev_c, bar,
                    spread, fixed, rel, leverage, toc, hedging):
    """``_Broker._process_orders`` at one bar (``reprocess_orders`` is the outer loop)."""
    reprocess = cnt[C_NQ] > 0
    while reprocess:
        reprocess = False
        nsnap = cnt[C_NQ]
        snapshot = qi[:nsnap, Q_ORD].copy()
        for s in range(nsnap):
            r = _find(qi, cnt[C_NQ], snapshot[s])
            if r < 0:
                continue  # removed by an earlier fill (its trade closed)
            osize = qf[r, Q_SIZE]
            is_long = osize > 0
            kind = qi[r, Q_KIND]
            contingent = kind == K_SL or kind == K_TP
            stop = qf[r, Q_STOP]
            has_stop = _set(stop)
            if has_stop:
                hit = (h >= stop) if is_long else (l_ <= stop)
                if not hit:
                    continue
                qf[r, Q_STOP] = np.nan  # a triggered stop order becomes a market/limit order
            limit = qf[r, Q_LIMIT]
            has_limit = _set(limit)
            if has_limit:
                limit_hit = (l_ <= limit) if is_long else (h >= limit)
                if is_long:
                    before_stop = limit_hit and limit <= (stop if has_stop else -np.inf)
                else:
                    before_stop = limit_hit and limit >= (stop if has_stop else np.inf)
                if not limit_hit or before_stop:
                    continue
                if is_long:
                    price = min(stop if has_stop else o_, limit)
                else:
                    price = max(stop if has_stop else o_, limit)
            else:
                price = prev_c if (toc and not contingent) else o_
                if has_stop:
                    price = max(price, stop) if is_long else min(price, stop)
            is_market = not has_limit and not has_stop
            time_index = bar - 1 if (is_market and toc and not contingent) else bar

            t = qi[r, Q_TRADE]
            if t >= 0:  # SL/TP or Trade.close() order of an existing trade
                prev = tf[t, T_SIZE]
                size = math.copysign(min(abs(prev), abs(osize)), osize)
                if _is_active(active, cnt, t):
                    status = _reduce_trade(qf, qi, tf, ti, active, closed, cnt, acc, t, price, size, True,
                                           time_index, fixed, rel)
                    if status != OK:
                        return status
                if contingent:
                    if _find(qi, cnt[C_NQ], snapshot[s]) >= 0 or osize != -tf[t, T_SIZE]:
                        return BAD_STATE  # backtesting.py's asserts
                else:
                    if not abs(prev) >= abs(size) >= 1:
                        return BAD_STATE
                    r = _find(qi, cnt[C_NQ], snapshot[s])
                    _remove_row(qf, qi, cnt, r)
                continue

            # A stand-alone order.
            base = price if price != 0 else c
            adjusted = base * (1 + math.copysign(spread, osize))
            adjusted_plus_comm = adjusted + _commission(osize, price, fixed, rel) / abs(osize)
            size = osize
            if -1 < size < 1:
                units = int((_margin_available(tf, active, cnt, acc, c, leverage) * leverage * abs(size))
                            // adjusted_plus_comm)
                size = math.copysign(units, size)
                if units == 0:  # not enough margin for one unit: dropped with a UserWarning
                    cnt[C_MARGIN_CANCELS] += 1
                    _remove_row(qf, qi, cnt, r)
                    continue
            need = int(size)
            need_float = False
            if not hedging:  # close opposite trades oldest-first, at the price without spread
                nsnap_t = cnt[C_NACTIVE]
                tsnap = active[:nsnap_t].copy()
                for k in range(nsnap_t):
                    tt = tsnap[k]
                    if (tf[tt, T_SIZE] > 0) == is_long:
                        continue
                    if abs(need) >= abs(tf[tt, T_SIZE]):
                        status = _close_trade(qf, qi, tf, ti, active, closed, cnt, acc, tt, price, time_index,
                                              fixed, rel)
                        if status != OK:
                            return status
                        need = need + tf[tt, T_SIZE]
                        need_float = need_float or ti[tt, T_FLOAT] == 1
                    else:
                        status = _reduce_trade(qf, qi, tf, ti, active, closed, cnt, acc, tt, price, float(need),
                                               need_float, time_index, fixed, rel)
                        if status != OK:
                            return status
                        need = 0.0
                        need_float = False
                    if need == 0:
                        break
            r = _find(qi, cnt[C_NQ], snapshot[s])
            if abs(need) * adjusted_plus_comm > _margin_available(tf, active, cnt, acc, c, leverage) * leverage:
                cnt[C_MARGIN_CANCELS] += 1
                _remove_row(qf, qi, cnt, r)
                continue
            if need != 0:
                sl = qf[r, Q_SL]
                tp = qf[r, Q_TP]
                status = _open_trade(qf, qi, tf, ti, active, cnt, acc, adjusted, float(need), need_float, sl, tp,
                                     time_index, qi[r, Q_TAG], c, spread, fixed, rel)
                if status != OK:
                    return status
                r = _find(qi, cnt[C_NQ], snapshot[s])
                if _set(sl) or _set(tp):
                    if is_market:
                        reprocess = True  # SL/TP may fill on the entry bar itself
                    elif has_stop and not has_limit and _set(tp) and (
                            (is_long and tp <= h and (sl if _set(sl) else -np.inf) < l_) or
                            (not is_long and tp >= l_ and (sl if _set(sl) else np.inf) > h)):
                        reprocess = True
                    elif ((l_ <= (sl if _set(sl) else -np.inf) <= h) or
                          (l_ <= (tp if _set(tp) else -np.inf) <= h)):
                        cnt[C_DEFERRED] += 1  # backtesting.py warns and defers to the next bar
            _remove_row(qf, qi, cnt, r)
    return OK


@njit(cache=True)
def next_bar(qf, qi, tf, ti, active, closed, cnt, acc, o_, h, l_, c, prev_c, bar,
             spread, fixed, rel, leverage, toc, hedging):
    """``_Broker.next``: fill what the bar allows, then mark equity; at equity <= 0 close all and stop.

    Returns ``(status, equity)``.
    """
    status = _process_orders(qf, qi, tf, ti, active, closed, cnt, acc, o_, h, l_, c, prev_c, bar,
                             spread, fixed, rel, leverage, toc, hedging)
    if status != OK:
        return status, np.nan
    equity = _equity(tf, active, cnt, acc, c)
    if equity <= 0:
        # ``for trade in self.trades: self._close_trade(...)`` removes while iterating: every
        # other trade is skipped, exactly as in backtesting.py.
        k = 0
        while k < cnt[C_NACTIVE]:
            status = _close_trade(qf, qi, tf, ti, active, closed, cnt, acc, active[k], c, bar, fixed, rel)
            if status != OK:
                return status, np.nan
            k += 1
        acc[A_CASH] = 0.0
        cnt[C_STOPPED] = 1
        return OUT_OF_MONEY, 0.0
    return OK, equity


@njit(cache=True)
def apply_event(qf, qi, tf, ti, active, cnt, kind, size, limit, stop, sl, tp, ref, tag,
                last, spread, exclusive):
    """One decision of ``Strategy.init``/``next``: an order, an SL/TP change, a close or a cancel."""
    nan = np.nan
    if kind == E_NEW:
        status = _check_order(size, limit, stop, sl, tp, last, spread)
        if status != OK:
            return status
        if exclusive:
            k = 0  # ``for o in self.orders: o.cancel()`` skips the order after each removed one
            while k < cnt[C_NQ]:
                if qi[k, Q_KIND] != K_SL and qi[k, Q_KIND] != K_TP:
                    _remove_row(qf, qi, cnt, k)
                k += 1
            for k in range(cnt[C_NACTIVE]):
                t = active[k]
                _insert_row(qf, qi, cnt, True, _close_order_size(tf[t, T_SIZE]), nan, nan, nan, nan,
                            t, K_CLOSE, ti[t, T_TAG])
        _insert_row(qf, qi, cnt, False, size, limit, stop, sl, tp, -1, K_ORDER, tag)
        return OK
    if ref < 0 or (kind != E_CANCEL and ref >= cnt[C_NTRADES]):
        return BAD_REF
    if kind == E_CONTINGENT:
        is_sl = _set(stop)
        if is_sl == _set(limit) or _set(sl) or _set(tp) or size != -tf[ref, T_SIZE] or tag != ti[ref, T_TAG]:
            return BAD_EVENT
        col = T_SL_ORD if is_sl else T_TP_ORD
        if ti[ref, col] >= 0 and _find(qi, cnt[C_NQ], ti[ref, col]) >= 0:
            return BAD_EVENT  # Trade.sl/.tp cancels the old order first
        if ti[ref, col] >= 0:
            return BAD_REF  # its old order left the queue: cancelling it raised ValueError
        return _set_contingent(qf, qi, tf, ti, cnt, ref, is_sl, stop if is_sl else limit, last, spread)
    if kind == E_CLOSE:
        tsize = tf[ref, T_SIZE]
        if not (size * tsize < 0 and 1 <= abs(size) <= abs(tsize) and size == math.floor(size)):
            return BAD_EVENT
        _insert_row(qf, qi, cnt, True, size, nan, nan, nan, nan, ref, K_CLOSE, ti[ref, T_TAG])
        return OK
    if kind == E_CANCEL:
        r = _find(qi, cnt[C_NQ], ref)
        if r < 0:
            return BAD_REF
        t = qi[r, Q_TRADE]
        if t >= 0:  # Order.cancel() detaches a trade's SL/TP order
            if qi[r, Q_KIND] == K_SL and ti[t, T_SL_ORD] == ref:
                ti[t, T_SL_ORD] = -1
                tf[t, T_SL] = nan
            elif qi[r, Q_KIND] == K_TP and ti[t, T_TP_ORD] == ref:
                ti[t, T_TP_ORD] = -1
                tf[t, T_TP] = nan
        _remove_row(qf, qi, cnt, r)
        return OK
    return BAD_EVENT


@njit(cache=True)
def finalize(qf, qi, tf, ti, active, cnt):
    """``finalize_trades``: ``for trade in reversed(broker.trades): trade.close()``."""
    for k in range(cnt[C_NACTIVE] - 1, -1, -1):
        t = active[k]
        _insert_row(qf, qi, cnt, True, _close_order_size(tf[t, T_SIZE]), np.nan, np.nan, np.nan, np.nan,
                    t, K_CLOSE, ti[t, T_TAG])


@njit(cache=True)
def room(qf, tf, cnt, extra):
    """Enough free rows for one more step: a bar's fills, or one decision (``extra`` more orders)?

    A fill opens at most two Trade objects (a reduced copy and a new trade) and two
    contingent orders, and the orders are processed at most twice per bar; a decision
    adds at most one order per open trade (exclusive_orders) plus its own.
    """
    nq = cnt[C_NQ] + extra
    free_q = qf.shape[0] - cnt[C_NQ]
    free_t = tf.shape[0] - cnt[C_NTRADES]
    return free_q >= 5 * nq + cnt[C_NACTIVE] + 4 and free_t >= 8 * nq + 8


@njit(cache=True)
def run_bars(qf, qi, tf, ti, active, closed, cnt, acc, O, H, L, C, equity,
             ev_bar, ev_kind, ev_size, ev_limit, ev_stop, ev_sl, ev_tp, ev_ref, ev_tag,
             start, bar, pos, phase, spread, fixed, rel, leverage, toc, hedging, exclusive, do_finalize):
    """``Backtest.run``'s loop over bars ``start..n-1`` (``start`` = warm-up + 1), resumable.

    Resumes at ``bar`` with event ``pos``; ``phase`` 0 = before the bar's fills, 1 = its
    decisions, 2 = done. Returns ``(status, bar, pos, phase)``; on ``NEED_ROOM`` the caller
    grows the arrays and calls again with the returned position.
    """
    n = len(C)
    nev = len(ev_bar)
    while pos < nev and ev_bar[pos] == -1:  # decisions of Strategy.init(): the whole series is visible
        if not room(qf, tf, cnt, 1):
            return NEED_ROOM, bar, pos, phase
        status = apply_event(qf, qi, tf, ti, active, cnt, ev_kind[pos], ev_size[pos], ev_limit[pos],
                             ev_stop[pos], ev_sl[pos], ev_tp[pos], ev_ref[pos], ev_tag[pos], C[n - 1],
                             spread, exclusive)
        if status != OK:
            return status, bar, pos, phase
        pos += 1
    i = bar
    while i < n and phase != 2:
        if phase == 0 and cnt[C_NQ] == 0:  # nothing to fill: only mark equity (most bars)
            eq = _equity(tf, active, cnt, acc, C[i])
            if eq > 0:
                equity[i] = eq
                phase = 1
        if phase == 0:
            if not room(qf, tf, cnt, 0):
                return NEED_ROOM, i, pos, phase
            status, eq = next_bar(qf, qi, tf, ti, active, closed, cnt, acc, O[i], H[i], L[i], C[i], C[i - 1], i,
                                  spread, fixed, rel, leverage, toc, hedging)
            if status == OUT_OF_MONEY:
                equity[i:] = 0.0
                return OUT_OF_MONEY, i, pos, 2
            if status != OK:
                return status, i, pos, phase
            equity[i] = eq
            phase = 1
        while pos < nev and ev_bar[pos] == i:
            if not room(qf, tf, cnt, 1):
                return NEED_ROOM, i, pos, phase
            status = apply_event(qf, qi, tf, ti, active, cnt, ev_kind[pos], ev_size[pos], ev_limit[pos],
                                 ev_stop[pos], ev_sl[pos], ev_tp[pos], ev_ref[pos], ev_tag[pos], C[i],
                                 spread, exclusive)
            if status != OK:
                return status, i, pos, phase
            pos += 1
        if pos < nev and ev_bar[pos] < i:
            return BAD_EVENT, i, pos, phase  # out of order
        phase = 0
        i += 1
    if phase == 2:
        return OK, n - 1, pos, phase
    if pos < nev:
        return BAD_EVENT, n - 1, pos, phase  # decisions after the last bar
    if do_finalize and start < n:
        if not room(qf, tf, cnt, cnt[C_NACTIVE]):
            return NEED_ROOM, n, pos, phase
        finalize(qf, qi, tf, ti, active, cnt)
        status, eq = next_bar(qf, qi, tf, ti, active, closed, cnt, acc, O[n - 1], H[n - 1], L[n - 1], C[n - 1],
                              C[n - 2] if n > 1 else C[n - 1], n - 1, spread, fixed, rel, leverage, toc, hedging)
        if status == OUT_OF_MONEY:
            equity[n - 1:] = 0.0
        elif status != OK:
            return status, n - 1, pos, phase
        else:
            equity[n - 1] = eq
    return OK, n - 1, pos, 2
