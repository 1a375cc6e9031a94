{{/* Names and labels shared by every template. */}}

{{- define "imagewarm.fullname" -}}
{{- if contains "imagewarm" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-imagewarm" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Every object: part-of imagewarm (the webhook's objectSelector skips pods carrying it). */}}
{{- define "imagewarm.labels" -}}
app.kubernetes.io/name: imagewarm
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: imagewarm
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: include with (dict "root" $ "component" "proxy"). */}}
{{- define "imagewarm.selector" -}}
app.kubernetes.io/name: imagewarm
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "imagewarm.componentLabels" -}}
{{ include "imagewarm.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "imagewarm.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "imagewarm.webhookEnabled" -}}
{{- if ne .Values.mode "mirror" }}true{{ end -}}
{{- end -}}

{{- define "imagewarm.proxyPrefix" -}}
{{- printf "localhost:%d" (int .Values.proxy.port) -}}
{{- end -}}

{{- define "imagewarm.webhookService" -}}
{{- printf "%s-webhook" (include "imagewarm.fullname" .) -}}
{{- end -}}

{{- define "imagewarm.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "imagewarm.fullname" .) -}}
{{- end -}}

{{/* Registries the proxy mirrors (mode mirror or both): mirror.registries, else every upstream. */}}
{{- define "imagewarm.mirrorRegistries" -}}
{{- if .Values.mirror.registries -}}
{{- toJson .Values.mirror.registries -}}
{{- else -}}
{{- toJson (concat .Values.upstreams .Values.insecureUpstreams) -}}
{{- end -}}
{{- end -}}

{{/* Pods of the webhook and the controller tolerate the proxy's startup taint: they do not pull
through the proxy (imagewarm's own pods are never rewritten), and must run before it is ready. */}}
{{- define "imagewarm.startupToleration" -}}
- key: imagewarm.io/proxy-not-ready
  operator: Exists
  effect: NoSchedule
{{- end -}}

{{- define "imagewarm.restrictedContainer" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}
